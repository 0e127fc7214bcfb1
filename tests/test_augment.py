"""Contracts of simple_diffusion.augment: exact label counts, the no-leak rule of the k-shot generator (spied on),
SDEdit's two limits (identity at t=0, an ordinary sample at t=T-1, checked against the exact mixture denoiser), the
classifier pieces, every bad input, and the `augment` CLI subcommand."""
import math

import numpy as np
import pytest
import torch

import simple_diffusion.augment as aug
from simple_diffusion.augment import (FlatDenoiser, augment_dataset, classic_augment, kshot_experiment,
                                      kshot_indices, nearest_distance, train_classifier, train_kshot_generator, vary)
from simple_diffusion.data import GaussianMixture, load_digits
from simple_diffusion.guidance import ConditionalOracle
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.sampling import sample
from simple_diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

SCHED = NoiseSchedule.from_name("cosine", 1000)
MIX = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 2.5]], dtype=torch.float64),
                      torch.full((3,), 0.5, dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
ORACLE = ConditionalOracle(MIX, SCHED)
UNCOND = GaussianMixtureOracle(MIX, SCHED)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def tiny_generator(digits):
    (x, y), _ = digits
    idx = kshot_indices(y, 2, seed=0)
    return train_kshot_generator(x[idx], y[idx], steps=20, seed=0)


# --- k-shot draws -------------------------------------------------------------------------------------------------

def test_kshot_indices_exact_counts_reproducible(digits):
    (_, y), _ = digits
    for k in (1, 3, 20):
        idx = kshot_indices(y, k, seed=4)
        assert torch.equal(torch.bincount(y[idx]), torch.full((10,), k))
        assert len(idx.unique()) == len(idx) and torch.equal(idx, idx.sort().values)
        assert torch.equal(idx, kshot_indices(y, k, seed=4))
    assert not torch.equal(kshot_indices(y, 5, seed=0), kshot_indices(y, 5, seed=1))


# --- no leak ------------------------------------------------------------------------------------------------------

class SpyTrainer(aug.Trainer):
    "The real Trainer, recording the data it is given."
    seen = []

    def __init__(self, config, out_dir=None, *, model=None, data=None):
        SpyTrainer.seen.append(data)
        super().__init__(config, out_dir, model=model, data=data)


def test_generator_trains_on_exactly_the_kshot_images(digits, monkeypatch):
    (x, y), _ = digits
    idx = kshot_indices(y, 3, seed=2)
    monkeypatch.setattr(aug, "Trainer", SpyTrainer)
    SpyTrainer.seen = []
    model, schedule = train_kshot_generator(x[idx], y[idx], steps=2, seed=0)
    (dx, dy), = SpyTrainer.seen
    assert torch.equal(dx, x[idx]) and torch.equal(dy, y[idx])
    assert model.num_classes == 10 and isinstance(model, FlatDenoiser)


def test_kshot_experiment_never_shows_the_generator_other_images(digits, monkeypatch):
    "Every generator (selection and final) sees a subset of the k-shot images; the final one sees all of them."
    train, test = digits
    k, seed = 4, 3
    idx = kshot_indices(train[1], k, seed)
    monkeypatch.setattr(aug, "Trainer", SpyTrainer)
    SpyTrainer.seen = []
    r = kshot_experiment(k, seed, train, test, ms=(1,), t_starts=(300,), weights=(0.0, 1.0), gen_steps=2,
                         clf_steps=2, sample_steps=2)
    assert len(SpyTrainer.seen) == 2            # the selection generator, then the final one
    kshot = {tuple(v.flatten().tolist()) for v in train[0][idx]}
    for dx, dy in SpyTrainer.seen:
        assert {tuple(v.flatten().tolist()) for v in dx} <= kshot
    assert torch.equal(SpyTrainer.seen[-1][0], train[0][idx]) and torch.equal(SpyTrainer.seen[-1][1], train[1][idx])
    assert len(SpyTrainer.seen[0][0]) == 10 * (k - k // 2)     # the validation half is held out
    assert set(r["accuracy"]) == {"real", "real+classic", "real+syn 1k", "syn only", "real+sdedit t=300"}
    assert r["guidance"] in (0.0, 1.0) and all(0 <= a <= 1 for a in r["accuracy"].values())


# --- augment_dataset ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_, want", [(4, [4, 4, 4]), ([2, 0, 5], [2, 0, 5]),
                                            (torch.tensor([2, 2, 0, 1, 2]), [1, 1, 3])])
def test_labels_match_the_requested_counts(request_, want):
    x, y = augment_dataset(ORACLE, SCHED, request_, guidance=1.0, shape=(2,), steps=10, chunk=3, seed=0,
                           clip_denoised=False)
    assert torch.equal(torch.bincount(y, minlength=3), torch.tensor(want))
    assert x.shape == (sum(want), 2) and torch.isfinite(x).all()
    if isinstance(request_, torch.Tensor):
        assert torch.equal(y, request_)


def test_augment_dataset_samples_the_requested_class():
    "With the exact conditional denoiser each sample lands in its own component (means 2 apart, std 0.5)."
    x, y = augment_dataset(ORACLE, SCHED, 200, shape=(2,), steps=50, seed=0, clip_denoised=False)
    nearest = torch.cdist(x.double(), MIX.means).argmin(1)
    assert (nearest == y).double().mean() > 0.9      # Bayes accuracy of the mixture is ~0.95


def test_augment_dataset_is_reproducible_and_images_shape(tiny_generator):
    model, schedule = tiny_generator
    a = augment_dataset(model, schedule, 2, 1.0, steps=4, seed=5)
    b = augment_dataset(model, schedule, 2, 1.0, steps=4, seed=5)
    assert torch.equal(a[0], b[0]) and a[0].shape == (20, 1, 8, 8) and a[0].abs().max() <= 1


# --- SDEdit -------------------------------------------------------------------------------------------------------

def test_vary_at_zero_returns_the_input(tiny_generator):
    model, schedule = tiny_generator
    x0 = load_digits("test")[0][:6]
    out = vary(model, schedule, x0, 0, torch.arange(6), 2.0)
    assert torch.equal(out, x0) and out is not x0
    ones = torch.ones(5, 2, dtype=torch.float64)
    assert torch.equal(vary(UNCOND, SCHED, ones, 0), ones)


def test_vary_at_T_minus_1_is_sample_from_the_same_start(tiny_generator):
    "Same steps as sample(spacing='trailing'): bit for bit from the same x_{T-1}."
    model, schedule = tiny_generator
    x0, y = load_digits("test")[0][:6], torch.arange(6)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    T = schedule.num_timesteps
    edit = vary(model, schedule, x0, T - 1, y, 1.5, steps=8, noise=z)
    start = aug.q_sample(schedule, x0, torch.full((6,), T - 1), z)
    ref = sample(model, schedule, x0.shape, "ddim", steps=8, spacing="trailing", clip_denoised=True, noise=start,
                 y=y, guidance=1.5)
    assert torch.equal(edit, ref)


def test_vary_at_T_minus_1_forgets_the_input_statistically():
    """Edits of a far-away point (5, 5) at t=T-1 have the mixture's distribution: mean and second moments match
    those of ordinary samples within 5 standard errors (N=4000 each; the sampler's discretisation is shared)."""
    n, T = 4000, SCHED.num_timesteps
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 2), 5.0, dtype=torch.float64)
    edit = vary(UNCOND, SCHED, x0, T - 1, steps=50, generator=g, clip_denoised=False)
    ref = sample(UNCOND, SCHED, (n, 2), "ddim", steps=50, spacing="trailing", dtype=torch.float64,
                 generator=torch.Generator().manual_seed(1))
    for f in (lambda v: v, lambda v: v ** 2, lambda v: v[:, :1] * v[:, 1:]):
        a, b = f(edit), f(ref)
        se = torch.sqrt(a.var(0) / n + b.var(0) / n)
        assert ((a.mean(0) - b.mean(0)).abs() < 5 * se).all(), (a.mean(0), b.mean(0), se)
    # and the exact mixture: the mean of p(x0) is sum_k pi_k mu_k
    mu = (MIX.weights[:, None] * MIX.means).sum(0)
    assert ((edit.mean(0) - mu).abs() < 5 * edit.std(0) / math.sqrt(n) + 0.05).all()


def test_vary_small_t_stays_close_and_keeps_the_class():
    "At t=100 (ᾱ≈0.98) an edit of a component mean stays in that component under the exact conditional model."
    x0 = MIX.means.repeat(100, 1)
    y = torch.arange(3).repeat(100)
    out = vary(ORACLE, SCHED, x0, 100, y, steps=50, generator=torch.Generator().manual_seed(0),
               clip_denoised=False)
    assert (torch.cdist(out, MIX.means).argmin(1) == y).double().mean() > 0.97


# --- classifier pieces --------------------------------------------------------------------------------------------

def test_classic_augment_identity_and_range():
    x = load_digits("test")[0][:16]
    g = torch.Generator().manual_seed(0)
    assert (classic_augment(x, g, 0, 0) - x).abs().max() < 1e-5
    out = classic_augment(x, g)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_train_classifier_learns(digits):
    (x, y), (xt, yt) = digits
    net = train_classifier(x[:500], y[:500], steps=150, seed=0, width=16)
    assert aug.accuracy(net, xt, yt) > 0.7          # chance is 0.1; the full classifier reaches ~0.98


def test_nearest_distance_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 3, generator=g), torch.randn(7, 3, generator=g)
    ya, yb = torch.randint(0, 2, (20,), generator=g), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    brute = [min(float((ai - bj).norm()) for bj, c in zip(b, yb) if c == ca) for ai, ca in zip(a, ya)]
    assert np.allclose(nearest_distance(a, b, ya, yb), brute, atol=1e-6)
    assert np.allclose(nearest_distance(b, b), 0)


# --- bad input ----------------------------------------------------------------------------------------------------

def test_bad_input(digits, tiny_generator):
    (x, y), _ = digits
    model, schedule = tiny_generator
    x0 = x[:4]
    cases = [
        (lambda: kshot_indices(y, 0), "k"),
        (lambda: kshot_indices(y, 10_000), "k"),
        (lambda: kshot_indices(y.float(), 2), "y"),
        (lambda: kshot_indices(y, 2, seed=-1), "seed"),
        (lambda: train_kshot_generator(x[:5], y[:4]), "y"),
        (lambda: train_kshot_generator(x[y < 5], y[y < 5] + 1), "y"),
        (lambda: train_kshot_generator(x[:20], y[:20], steps=0), "steps"),
        (lambda: train_kshot_generator(x[:20].long(), y[:20]), "x"),
        (lambda: augment_dataset(model, schedule, -1), "labels_or_counts"),
        (lambda: augment_dataset(model, schedule, [1, 2.5]), "labels_or_counts"),
        (lambda: augment_dataset(model, schedule, "ten"), "labels_or_counts"),
        (lambda: augment_dataset(model, schedule, [0] * 11 + [1]), "labels_or_counts"),
        (lambda: augment_dataset(model, schedule, 2, guidance=-0.5), "guidance"),
        (lambda: augment_dataset(model, schedule, 2, sampler="euler"), "sampler"),
        (lambda: augment_dataset(model, schedule, 2, chunk=0), "chunk"),
        (lambda: augment_dataset(ORACLE, SCHED, 2), "shape"),
        (lambda: augment_dataset(UNCOND, SCHED, 2, shape=(2,)), "labels_or_counts"),
        (lambda: vary(model, schedule, x0, -1), "t_start"),
        (lambda: vary(model, schedule, x0, 1000), "t_start"),
        (lambda: vary(model, schedule, x0, 1.5), "t_start"),
        (lambda: vary(model, schedule, x0, 10, y[:3]), "y"),
        (lambda: vary(model, schedule, x0, 10, y[:4].float()), "y"),
        (lambda: vary(model, schedule, x0, 10, None, 1.0), "guidance"),
        (lambda: vary(model, schedule, x0, 10, steps=0), "steps"),
        (lambda: vary(model, schedule, x0, 10, sampler="euler"), "sampler"),
        (lambda: vary(model, schedule, "x", 10), "x0"),
        (lambda: classic_augment(x0[0], torch.Generator()), "x"),
        (lambda: classic_augment(x0, torch.Generator(), max_shift=-1), "max_shift"),
        (lambda: train_classifier(x0, y[:3]), "y"),
        (lambda: train_classifier(x0, y[:4], steps=0), "steps"),
        (lambda: nearest_distance(x0, x0, y[:4]), "reference_y"),
    ]
    for f, name in cases:
        with pytest.raises(ValueError, match=name):
            f()


# --- the CLI ------------------------------------------------------------------------------------------------------

def test_cli_augment_pretrained(tmp_path, capsys):
    from simple_diffusion.cli import main
    out = tmp_path / "aug.npz"
    assert main(["augment", "--pretrained", "digits_cond", "--per-class", "3", "--steps", "4", "--guidance", "1",
                 "--seed", "2", "--out", str(out), "--quiet"]) == 0
    d = np.load(out)
    assert d["x"].shape == (30, 1, 8, 8) and np.abs(d["x"]).max() <= 1
    assert np.array_equal(np.bincount(d["y"]), np.full(10, 3))
    assert "wrote 30 images" in capsys.readouterr().out


def test_cli_augment_checkpoint_and_errors(tmp_path, capsys):
    from simple_diffusion.cli import main
    from simple_diffusion.training import train
    run = tmp_path / "run"
    train(run, progress=False, data="digits", steps=2, ckpt_every=2, class_conditional=True, batch_size=8)
    out = tmp_path / "a.npz"
    assert main(["augment", "--checkpoint", str(run), "--per-class", "2", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    d = np.load(out)
    assert d["x"].shape == (20, 1, 8, 8) and np.array_equal(np.bincount(d["y"]), np.full(10, 2))
    capsys.readouterr()
    assert main(["augment", "--pretrained", "digits", "--per-class", "2", "--out", str(out)]) == 1
    assert "class-conditional" in capsys.readouterr().err
    assert main(["augment", "--pretrained", "digits_cond", "--per-class", "0", "--out", str(out)]) == 1
    assert "--per-class" in capsys.readouterr().err
    assert main(["augment", "--pretrained", "digits_cond", "--per-class", "2", "--out", str(tmp_path / "a.npy")]) == 1
    assert "--out" in capsys.readouterr().err
