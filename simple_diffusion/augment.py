# %% imports
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from torch import nn

from .core import check_choice, check_int, check_number, check_tensor
from .forward import q_sample
from .guidance import ClassifierFreeGuidance, guided_sample
from .metrics import DigitsClassifier, extract_features, precision_recall
from .sampling import SAMPLERS, Denoiser, SpacedSchedule, run_sampler, space_timesteps
from .schedules import NoiseSchedule
from .training import TrainConfig, Trainer

# %% kshot
def _check_labels(y, name: str = "y") -> torch.Tensor:
    "A 1-D integer tensor of class labels >= 0."
    y = check_tensor(y, name, floating=False)
    if y.ndim != 1 or y.is_complex() or y.dtype == torch.bool or (len(y) and int(y.min()) < 0):
        raise ValueError(f"{name} must be a 1-D integer tensor of labels >= 0, got {y!r:.60}")
    return y


def kshot_indices(
    y: torch.Tensor,  # [N] integer labels of the pool to draw from (e.g. the training split)
    k: int,  # examples per class, 1 <= k <= the smallest class's size
    seed: int = 0,  # seeds the draw
) -> torch.Tensor:  # [k * K] sorted indices into y, exactly k of each class
    "Draw k examples of every class present in `y` without replacement, reproducibly."
    y = _check_labels(y)
    classes, sizes = y.unique(return_counts=True)
    k = check_int(k, "k", 1, int(sizes.min()) if len(sizes) else 1)
    gen = torch.Generator().manual_seed(check_int(seed, "seed", 0))
    idx = [torch.nonzero(y == c).flatten() for c in classes]
    picks = [i[torch.randperm(len(i), generator=gen)[:k]] for i in idx]
    return torch.cat(picks).sort().values

# %% flat
class FlatDenoiser(nn.Module):
    "A vector network used on images: flatten x [B, C, H, W], run it, reshape the output back."

    def __init__(
        self,
        net: nn.Module,  # net(x [B, D], t [B], y=[B]) -> [B, D], e.g. nets.MLPDenoiser
        data_shape: tuple,  # one example, e.g. (1, 8, 8); D = its number of elements
    ):
        super().__init__()
        self.net, self.data_shape = net, tuple(data_shape)
        self.num_classes = getattr(net, "num_classes", None)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:  # [B, *data_shape], like x
        return self.net(x.flatten(1), t, y=y).view_as(x)

# %% generator
def train_kshot_generator(
    x: torch.Tensor,  # [n, C, H, W] the k-shot images, and nothing else
    y: torch.Tensor,  # [n] their labels; every class 0 … K-1 must appear
    steps: int = 600,  # optimiser steps, >= 1
    seed: int = 0,  # seeds the weights, the batches and the noise
    *,
    hidden: int = 256,  # width of the MLPDenoiser
    depth: int = 2,  # its residual blocks
    progress: bool = False,  # show a tqdm bar
    **config,  # other TrainConfig fields (lr, batch_size, p_uncond, num_timesteps, ...)
) -> tuple[FlatDenoiser, NoiseSchedule]:  # EMA network (eval, frozen), its schedule
    "A class-conditional MLP denoiser trained (Trainer, L_simple) on exactly the images it is given."
    x = check_tensor(x, "x", min_ndim=2, finite=True)
    y = _check_labels(y)
    if len(y) != len(x):
        raise ValueError(f"y must hold one label per image: len(y)={len(y)}, len(x)={len(x)}")
    K = int(y.max()) + 1
    if len(y.unique()) != K:
        raise ValueError(f"y must contain every class 0 … {K - 1}, got {y.unique().tolist()}")
    defaults = dict(lr=2e-3, batch_size=64, warmup=50, ema_decay=0.995, p_uncond=0.2)
    cfg = TrainConfig(
        **{**defaults, **config},
        data="kshot",
        steps=check_int(steps, "steps", 1),
        seed=check_int(seed, "seed", 0),
        model="mlp",
        model_kwargs=dict(hidden=hidden, depth=depth),
        class_conditional=True,
        device="cpu",
    )
    net = FlatDenoiser(cfg.make_model((math.prod(x.shape[1:]),), K), x.shape[1:])
    trainer = Trainer(cfg, None, model=net, data=(x, y))
    trainer.fit(progress=progress)
    return trainer.ema.module.eval().requires_grad_(False), trainer.schedule

# %% augment_dataset
def _labels_for(counts, num_classes) -> torch.Tensor:
    "The label vector a request names: an int (per class), a list of per-class counts, or labels."
    if isinstance(counts, torch.Tensor):
        return _check_labels(counts, "labels_or_counts").long().cpu()
    if isinstance(counts, (int, np.integer)) and not isinstance(counts, bool):
        if num_classes is None:
            raise ValueError("labels_or_counts as one count per class needs model.num_classes")
        counts = [counts] * num_classes
    if not isinstance(counts, (list, tuple)) or not counts:
        raise ValueError(
            "labels_or_counts must be an int (per class), a list of per-class counts or a "
            f"tensor of labels, got {counts!r}"
        )
    n = [check_int(c, f"labels_or_counts[{i}]", 0) for i, c in enumerate(counts)]
    return torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))


@torch.no_grad()
def augment_dataset(
    model: nn.Module,  # class-conditional model(x, t, y=) with num_classes K
    schedule: NoiseSchedule,  # the schedule it was trained with
    labels_or_counts,  # int m (m of each class), [m_0, …, m_{K-1}], or a label tensor [N]
    guidance: float = 0.0,  # classifier-free w >= 0 (Ho & Salimans 2021, Eq. 6)
    *,
    shape: tuple | None = None,  # one example's shape; None: model.data_shape
    sampler: str = "ddim",  # one of sampling.SAMPLERS
    steps: int = 50,  # network evaluations per sample
    chunk: int = 512,  # samples drawn per call (memory), >= 1
    seed: int = 0,  # seeds one generator for all chunks
    progress: bool = False,  # a tqdm bar over the chunks
    **sample_kwargs,  # anything else of guided_sample / sample (eta, spacing, ...)
) -> tuple[torch.Tensor, torch.Tensor]:  # x [N, *shape] in [-1, 1], y [N] (as requested)
    "A synthetic labelled set: guided_sample chunk by chunk, labels exactly as requested."
    K = getattr(model, "num_classes", None)
    y = _labels_for(labels_or_counts, K)
    if K is not None and len(y) and int(y.max()) >= K:
        raise ValueError(f"labels_or_counts names class {int(y.max())}; the model has K={K}")
    shape = getattr(model, "data_shape", None) if shape is None else shape
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape:
        raise ValueError(f"shape must be one example's shape, e.g. (1, 8, 8), got {shape!r}")
    shape = tuple(check_int(s, "shape", 1) for s in shape)
    check_choice(sampler, SAMPLERS, "sampler")
    chunk = check_int(chunk, "chunk", 1)
    gen = torch.Generator().manual_seed(check_int(seed, "seed", 0))
    sample_kwargs.setdefault("clip_denoised", True)
    out = []
    from tqdm import tqdm

    for lo in tqdm(range(0, len(y), chunk), disable=not progress, desc="augment"):
        yc = y[lo : lo + chunk]
        out.append(guided_sample(model, schedule, (len(yc), *shape), yc, guidance,
                                 sampler=sampler, steps=steps, generator=gen, **sample_kwargs))
    x = torch.cat(out).clamp(-1, 1) if out else torch.empty(0, *shape)
    return x, y

# %% vary
@torch.no_grad()
def vary(
    model: nn.Module,  # model(x, t) or model(x, t, y=) (class-conditional)
    schedule: NoiseSchedule,  # the schedule it was trained with (T steps)
    x0: torch.Tensor,  # [N, ...] real images to vary
    t_start: int,  # noise level, 0 … T-1: 0 returns x0; t >= 1 noises to code step t
    y: torch.Tensor | None = None,  # [N] labels kept by the variation; None: unconditional
    guidance: float = 0.0,  # classifier-free w >= 0 (needs y)
    *,
    steps: int = 50,  # network evaluations for the full range [0, T-1]; fewer below
    sampler: str = "ddim",  # one of SAMPLERS
    eta: float = 0.0,  # DDIM's η
    noise: torch.Tensor | None = None,  # [N, ...] ε of q_sample; drawn if None
    generator: torch.Generator | None = None,  # source of ε and of the sampler's noise
    clip_denoised: bool = True,  # clip x̂_0 to [-1, 1] (images)
    prediction: str = "eps",  # what the model predicts
) -> torch.Tensor:  # [N, ...] variations of x0
    "SDEdit (Meng et al. 2022, Sec. 3): x_t = q_sample(x0, t_start), then reverse from t_start."
    x0 = check_tensor(x0, "x0", finite=True)
    T = schedule.num_timesteps
    t_start = check_int(t_start, "t_start", 0, T - 1)
    steps = check_int(steps, "steps", 1, T)
    guidance = check_number(guidance, "guidance", 0)
    check_choice(sampler, SAMPLERS, "sampler")
    if y is not None:
        y = _check_labels(y)
        if len(y) != len(x0):
            raise ValueError(f"y must hold one label per image: {len(y)} labels, {len(x0)} images")
    if guidance > 0 and y is None:
        raise ValueError(f"guidance={guidance} needs the labels y")
    if t_start == 0:
        return x0.clone()
    S = max(1, math.ceil(steps * (t_start + 1) / T))
    ts = space_timesteps(t_start + 1, S, "trailing")  # trailing: the last one is t_start
    spaced = SpacedSchedule(schedule, ts)
    tt = torch.full((len(x0),), t_start, dtype=torch.long, device=x0.device)
    x_t = q_sample(schedule, x0, tt, noise, generator=generator)
    net = model
    kw = None
    if y is not None:
        net = ClassifierFreeGuidance(model, guidance) if guidance > 0 else model
        kw = dict(y=y.to(x0.device))
    denoiser = Denoiser(net, getattr(schedule, "parent", schedule), prediction, clip_denoised)
    return run_sampler(denoiser, spaced, x_t, sampler, eta, generator=generator,
                       model_kwargs=kw)

# %% classic
def classic_augment(
    x: torch.Tensor,  # [B, 1, H, W] images, background -1
    generator: torch.Generator,  # source of the random shifts and angles
    max_shift: float = 1.0,  # largest translation in pixels, >= 0
    max_degrees: float = 10.0,  # largest rotation in degrees, >= 0
) -> torch.Tensor:  # [B, 1, H, W] shifted and rotated copies (bilinear, filled with -1)
    "Random small rotations and sub-pixel shifts, the classic augmentation of digit images."
    x = check_tensor(x, "x", min_ndim=4)
    max_shift = check_number(max_shift, "max_shift", 0)
    max_degrees = check_number(max_degrees, "max_degrees", 0)
    B, H = len(x), x.shape[-1]
    u = torch.rand(B, 3, generator=generator).to(x) * 2 - 1
    a = u[:, 0] * math.radians(max_degrees)
    shift = u[:, 1:] * max_shift * 2 / H  # pixels -> [-1, 1] coordinates
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), shift[:, 0]], 1),
                         torch.stack([a.sin(), a.cos(), shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding = background

# %% classifier
def train_classifier(
    x: torch.Tensor,  # [N, 1, 8, 8] training images in [-1, 1]
    y: torch.Tensor,  # [N] their labels in [0, 10)
    steps: int = 300,  # optimiser steps, >= 1 (the same for every training set)
    seed: int = 0,  # seeds the weights, the batches, dropout and the augmentation
    *,
    augment: bool = False,  # classic augmentation (classic_augment) of every batch
    batch_size: int = 64,
    lr: float = 3e-3,  # peak learning rate of the one-cycle schedule
    **config,  # metrics.DigitsClassifier arguments (width, feature_dim, dropout)
) -> DigitsClassifier:  # in eval mode, frozen
    "Chapter 20's DigitsClassifier trained with AdamW + one-cycle on the given set only."
    x = check_tensor(x, "x", min_ndim=4, finite=True)
    y = _check_labels(y)
    if len(y) != len(x) or not len(x):
        raise ValueError(f"y must hold one label per image: len(y)={len(y)}, len(x)={len(x)}")
    steps = check_int(steps, "steps", 1)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(check_int(seed, "seed", 0))
        net, gen = DigitsClassifier(**config), torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        for _ in range(steps):
            i = torch.randint(len(x), (batch_size,), generator=gen)
            xb = classic_augment(x[i], gen) if augment else x[i]
            loss = F.cross_entropy(net(xb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def accuracy(
    net: nn.Module,  # eval-mode classifier: [B, 1, 8, 8] -> [B, K] logits
    x: torch.Tensor,  # [N, 1, 8, 8] images
    y: torch.Tensor,  # [N] labels
) -> float:  # the fraction classified correctly, in [0, 1]
    "Top-1 accuracy."
    return float((extract_features(x, net)[1].argmax(1) == y.numpy()).mean())

# %% diagnostics
def nearest_distance(
    samples: torch.Tensor,  # [M, ...] e.g. generated images
    reference: torch.Tensor,  # [N, ...] e.g. the k-shot training images
    samples_y: torch.Tensor | None = None,  # [M] labels: compare within a class only
    reference_y: torch.Tensor | None = None,  # [N] labels of the reference
) -> np.ndarray:  # [M] Euclidean (pixel) distance of each sample to its nearest reference
    "Nearest-neighbour distance, the memorisation diagnostic: 0 = an exact copy."
    a = check_tensor(samples, "samples").flatten(1).double().numpy()
    b = check_tensor(reference, "reference").flatten(1).double().numpy()
    d = cdist(a, b)
    if (samples_y is None) != (reference_y is None):
        raise ValueError("give both samples_y and reference_y, or neither")
    if samples_y is not None:
        same = _check_labels(samples_y, "samples_y")[:, None] == _check_labels(
            reference_y, "reference_y")[None, :]
        d = np.where(same.numpy(), d, np.inf)
    return d.min(1)

# %% experiment
TRAINING_SETS = ("real", "real+classic", "real+syn", "syn only", "real+sdedit")


def _per_class_prefix(x, y, m):
    "The first m examples of every class of (x, y)."
    keep = torch.cat([torch.nonzero(y == c).flatten()[:m] for c in y.unique()])
    return x[keep], y[keep]


def kshot_experiment(
    k: int,  # training images per class
    seed: int,  # seeds the k-shot draw, the generator, the samples and the classifiers
    train: tuple,  # (x, y) the pool the k-shot set is drawn from (digits' train split)
    test: tuple,  # (x, y) the held-out real images the classifiers are scored on
    *,
    ms: tuple = (1, 5, 20),  # synthetic images per class, in multiples of k
    t_starts: tuple = (300, 600),  # SDEdit noise levels (code steps)
    variations: int = 5,  # SDEdit variations per k-shot image
    weights: tuple = (0.0, 1.0, 3.0),  # guidance weights to choose from on the validation split
    default_weight: float = 1.0,  # the weight used when k = 1 leaves nothing to validate on
    gen_steps: int = 600,  # generator optimiser steps
    clf_steps: int = 200,  # classifier optimiser steps (identical for every training set)
    sample_steps: int = 20,  # DDIM steps per sample
    clf_width: int = 16,  # DigitsClassifier width (the same for every training set)
    gen_kwargs: dict | None = None,  # more train_kshot_generator arguments
) -> dict:  # test accuracy per training set, the chosen weight, diagnostics, seconds
    "One cell of the k-shot grid: generator on the k-shot images only, classifiers on each set."
    t0 = time.perf_counter()
    gk = dict(gen_kwargs or {})
    (xtr, ytr), (xte, yte) = train, test
    idx = kshot_indices(ytr, k, seed)
    xk, yk = xtr[idx], ytr[idx]
    fit_clf = lambda x, y, **kw: train_classifier(x, y, clf_steps, seed, width=clf_width, **kw)
    clf = lambda x, y, **kw: accuracy(fit_clf(x, y, **kw), xte, yte)
    # 1. the guidance weight, on a validation split of the k-shot set (never the test set)
    w, val_acc = float(default_weight), {}
    if k >= 2 and len(weights) > 1:
        fit = kshot_indices(yk, k - k // 2, seed + 1)
        val = torch.ones(len(yk), dtype=torch.bool)
        val[fit] = False
        g, s = train_kshot_generator(xk[fit], yk[fit], gen_steps, seed, **gk)
        for wi in weights:
            xs, ys = augment_dataset(g, s, 5 * (k - k // 2), wi, steps=sample_steps, seed=seed)
            net = fit_clf(torch.cat([xk[fit], xs]), torch.cat([yk[fit], ys]))
            val_acc[wi] = accuracy(net, xk[val], yk[val])
        w = max(val_acc, key=val_acc.get)  # ties: the smallest weight
    # 2. the generator on all k-shot images, and its samples
    g, s = train_kshot_generator(xk, yk, gen_steps, seed, **gk)
    xs, ys = augment_dataset(g, s, max(ms) * k, w, steps=sample_steps, seed=seed)
    acc = {"real": clf(xk, yk), "real+classic": clf(xk, yk, augment=True)}
    for m in ms:
        xm, ym = _per_class_prefix(xs, ys, m * k)
        acc[f"real+syn {m}k"] = clf(torch.cat([xk, xm]), torch.cat([yk, ym]))
    acc["syn only"] = clf(xs, ys)
    gen = torch.Generator().manual_seed(seed)
    for t in t_starts:
        xr, yr = xk.repeat(variations, 1, 1, 1), yk.repeat(variations)
        xv = vary(g, s, xr, t, yr, w, steps=sample_steps, generator=gen).clamp(-1, 1)
        acc[f"real+sdedit t={t}"] = clf(torch.cat([xk, xv]), torch.cat([yk, yr]))
    # 3. diagnostics: recall of the k-shot set, and copies (nearest-neighbour distances)
    nn3 = min(3, len(xk) - 1)
    precision, recall = precision_recall(xk.flatten(1).numpy(), xs.flatten(1).numpy(), nn3)
    d_syn = nearest_distance(xs, xk, ys, yk)
    d_test = nearest_distance(xte, xk, yte, yk)
    return dict(
        k=k, seed=seed, guidance=w, val_accuracy={str(a): b for a, b in val_acc.items()},
        accuracy=acc, precision=precision, recall=recall,
        nn_syn_median=float(np.median(d_syn)), nn_test_median=float(np.median(d_test)),
        copies=float((d_syn < 0.1 * np.median(d_test)).mean()),
        seconds=round(time.perf_counter() - t0, 1),
    )
