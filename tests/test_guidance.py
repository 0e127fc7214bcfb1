"""Contracts of simple_diffusion.guidance: CFG and classifier guidance as model wrappers, checked against the exact
mixture denoiser, on the shipped digits models, and on every bad input."""
import json
import math

import pytest
import torch

from simple_diffusion.data import GaussianMixture, load_digits
from simple_diffusion.guidance import (ClassifierFreeGuidance, ClassifierGuidance, ConditionalOracle, NoisyClassifier,
                                       guidance_scale, guidance_weight, guided_sample, load_noisy_classifier,
                                       save_noisy_classifier, train_noisy_classifier)
from simple_diffusion.metrics import extract_features, load_digits_classifier
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.parameterization import PREDICTIONS, eps_from_v, eps_from_x0
from simple_diffusion.pretrained import load
from simple_diffusion.sampling import SAMPLERS, sample
from simple_diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

SCHED = NoiseSchedule.from_name("cosine", 1000)
MIX = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 2.5]], dtype=torch.float64),
                      torch.full((3,), 0.5, dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
ORACLE = ConditionalOracle(MIX, SCHED)
UNCOND = GaussianMixtureOracle(MIX, SCHED)


def exact_log_p(x, t):
    "The exact classifier log p(k | x_t) of the mixture."
    return UNCOND.responsibilities(x, t).log()


def points(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 3, (n,), generator=g))


def sliced_w1(a, b, n_proj=256, seed=0):
    "Sliced 1-Wasserstein distance of two equal-size point sets [N, 2] (mean over random directions)."
    th = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    th = th / th.norm(dim=0)
    return float(((a.double() @ th).sort(0)[0] - (b.double() @ th).sort(0)[0]).abs().mean())


@pytest.fixture(scope="module")
def digits_cond():
    return load("digits_cond")


def test_conventions():
    assert guidance_scale(0) == 1.0 and guidance_scale(3) == 4.0
    assert guidance_weight(1) == 0.0 and guidance_weight(guidance_scale(2.5)) == 2.5


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cfg_w0_is_conditional_bit_for_bit(sampler):
    x, t, y = points()
    assert torch.equal(ClassifierFreeGuidance(ORACLE, 0.0)(x, t, y), ORACLE(x, t, y))
    lab = torch.arange(3).repeat(20)
    run = lambda m: sample(m, SCHED, (60, 2), sampler, 15, generator=torch.Generator().manual_seed(1),
                           model_kwargs={"y": lab})
    assert torch.equal(run(ClassifierFreeGuidance(ORACLE, 0.0)), run(ORACLE))
    kw = dict(sampler=sampler, steps=15, generator=torch.Generator().manual_seed(1))
    a = guided_sample(ORACLE, SCHED, (60, 2), lab, 0.0, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    assert torch.equal(a, sample(ORACLE, SCHED, (60, 2), model_kwargs={"y": lab}, **kw))


def test_cfg_w0_unet_bit_for_bit(digits_cond):
    model, sched, _ = digits_cond
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g), torch.arange(6)
    assert torch.equal(ClassifierFreeGuidance(model, 0)(x, t, y), model(x, t, y))
    run = lambda m: sample(m, sched, (6, 1, 8, 8), "ddim", 3, generator=torch.Generator().manual_seed(3),
                           model_kwargs={"y": y})
    assert torch.equal(run(ClassifierFreeGuidance(model, 0.0)), run(model))


class CountCalls:
    def __init__(self, model):
        self.model, self.sizes = model, []

    num_classes = property(lambda self: self.model.num_classes)

    def __call__(self, x, t, y=None):
        self.sizes.append(len(x))
        return self.model(x, t, y=y)


def test_one_batched_call_equals_two_calls(digits_cond):
    x, t, y = points()
    counted = CountCalls(ORACLE)
    out = ClassifierFreeGuidance(counted, 2.0)(x, t, y)
    assert counted.sizes == [2 * len(x)]
    two = 3 * ORACLE(x, t, y) - 2 * ORACLE(x, t, torch.full_like(y, 3))
    assert torch.allclose(out, two, rtol=0, atol=1e-12)       # float64, row-wise: equal up to rounding
    model, _, _ = digits_cond
    g = torch.Generator().manual_seed(4)
    xd, td, yd = torch.randn(10, 1, 8, 8, generator=g), torch.randint(0, 1000, (10,), generator=g), torch.arange(10)
    counted = CountCalls(model)
    out = ClassifierFreeGuidance(counted, 1.5)(xd, td, yd)
    assert counted.sizes == [20]
    two = 2.5 * model(xd, td, yd) - 1.5 * model(xd, td, torch.full_like(yd, 10))
    # float32 convolutions may sum in another order for another batch size: 1e-5 of outputs of scale ~1
    assert (out - two).abs().max() < 1e-5


def test_learned_variance_channels_are_the_conditional_models():
    o = ConditionalOracle(MIX, SCHED, learned_range=True)
    x, t, y = points(64)
    out, cond = ClassifierFreeGuidance(o, 2.0)(x, t, y), o(x, t, y)
    assert out.shape == (64, 4)
    assert torch.allclose(out[:, 2:], cond[:, 2:], rtol=0, atol=1e-12)
    guided_eps = ClassifierFreeGuidance(ORACLE, 2.0)(x, t, y)
    assert torch.allclose(out[:, :2], guided_eps, rtol=0, atol=1e-10)
    xs = guided_sample(o, SCHED, (30, 2), torch.arange(3).repeat(10), 1.0, steps=10, variance="learned_range",
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(xs).all()


def test_interval_guidance():
    "Guidance only for code t in [lo, hi]: outside it the conditional output itself, inside it plain CFG."
    x, t, y = points()
    inside = (t >= 200) & (t <= 700)
    out = ClassifierFreeGuidance(ORACLE, 2.0, interval=(200, 700))(x, t, y)
    assert torch.equal(out[~inside], ORACLE(x[~inside], t[~inside], y[~inside]))
    assert torch.allclose(out[inside], ClassifierFreeGuidance(ORACLE, 2.0)(x, t, y)[inside], rtol=0, atol=1e-12)
    assert torch.equal(ClassifierFreeGuidance(ORACLE, 2.0, interval=(0, 999))(x, t, y),
                       ClassifierFreeGuidance(ORACLE, 2.0)(x, t, y))
    lab = torch.arange(3).repeat(4)
    kw = dict(steps=10, generator=torch.Generator().manual_seed(0))
    a = guided_sample(ORACLE, SCHED, (12, 2), lab, 2.0, interval=(1000, 1000), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(a, guided_sample(ORACLE, SCHED, (12, 2), lab, 0.0, **kw))   # never inside: w = 0
    for bad in ((5,), (700, 200), (-1, 3), "all", (0.5, 3)):
        with pytest.raises(ValueError, match="interval"):
            ClassifierFreeGuidance(ORACLE, 1.0, interval=bad)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_cfg_is_affine_in_every_prediction(prediction):
    x, t, y = points()
    g = ClassifierFreeGuidance(ConditionalOracle(MIX, SCHED, prediction=prediction), 1.5)(x, t, y)
    eps = eps_from_x0(SCHED, x, t, g) if prediction == "x0" else eps_from_v(SCHED, x, t, g)
    assert (eps - ClassifierFreeGuidance(ORACLE, 1.5)(x, t, y)).abs().max() < 1e-8


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_classifier_guidance_with_the_exact_classifier(prediction):
    "κ = 1: the unconditional oracle becomes the conditional one (Bayes); κ = 1 + w: it is CFG at w."
    x, t, y = points()
    o = GaussianMixtureOracle(MIX, SCHED, prediction=prediction)
    assert (ClassifierGuidance(o, exact_log_p, SCHED, 1.0, prediction)(x, t, y) - o(x, t, y)).abs().max() < 1e-8
    cg = ClassifierGuidance(o, exact_log_p, SCHED, 3.0, prediction)(x, t, y)
    cfg = ClassifierFreeGuidance(ConditionalOracle(MIX, SCHED, prediction=prediction), 2.0)(x, t, y)
    assert (cg - cfg).abs().max() < 1e-8
    assert torch.equal(ClassifierGuidance(o, exact_log_p, SCHED, 0.0, prediction)(x, t, y), o(x, t))


def test_oracle_w0_matches_the_conditional_and_w2_does_not():
    """With the exact denoiser, CFG at w = 0 samples p(x | y): its SW1 to exact draws is within the noise floor
    (the largest SW1 of five pairs of independent exact draws of the same size; x1.5 leaves room for 100 steps of
    discretisation). At w = 2 the same statistic is far outside it (the check can fail)."""
    n = 1000
    lab = torch.arange(3).repeat_interleave(n)
    g = torch.Generator().manual_seed(11)
    draw = lambda k: MIX.means[k] + MIX.stds[k] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    for sampler in ("ddpm", "ddim"):
        xs = {w: sample(ClassifierFreeGuidance(ORACLE, w), SCHED, (3 * n, 2), sampler, 100, spacing="trailing",
                        generator=torch.Generator().manual_seed(12), model_kwargs={"y": lab}) for w in (0, 2)}
        for k in range(3):
            floor = max(sliced_w1(draw(k), draw(k)) for _ in range(5))
            assert sliced_w1(xs[0][lab == k], draw(k)) < 1.5 * floor, (sampler, k)
            assert sliced_w1(xs[2][lab == k], draw(k)) > 2 * floor, (sampler, k)


def test_guidance_raises_digit_accuracy(digits_cond):
    """Seeded, 5 digits per class, DDIM 10 steps, the same x_T for every w. Accuracy of the held-out classifier on
    the requested label may not drop by more than one sample in 50 (0.02) from w = 0 to 1 to 2, and must be higher
    at w = 2 than at w = 0 or already perfect; the mean probability of the requested label rises strictly."""
    model, sched, _ = digits_cond
    clf = load_digits_classifier()
    lab = torch.arange(10).repeat_interleave(5)
    x_T = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    acc, conf = [], []
    for w in (0, 1, 2):
        xs = guided_sample(model, sched, (50, 1, 8, 8), lab, w, sampler="ddim", steps=10, clip_denoised=True, noise=x_T)
        p = extract_features(xs, clf)[1]
        acc.append(float((p.argmax(1) == lab.numpy()).mean()))
        conf.append(float(p[range(50), lab.numpy()].mean()))
    assert acc[1] >= acc[0] - 0.02 and acc[2] >= acc[1] - 0.02, acc
    assert acc[2] > acc[0] or acc[0] == 1.0, acc
    assert conf[0] < conf[1] < conf[2], conf


def test_classifier_guidance_on_digits_steers_the_unconditional_model():
    model, sched, _ = load("digits")
    clf, noisy = load_digits_classifier(), load_noisy_classifier()
    lab = torch.arange(10).repeat_interleave(3)
    x_T = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    xs = guided_sample(model, sched, (30, 1, 8, 8), lab, classifier=noisy, classifier_scale=4.0, sampler="ddim",
                       steps=10, clip_denoised=True, noise=x_T)
    acc = float((extract_features(xs, clf)[1].argmax(1) == lab.numpy()).mean())
    assert acc > 0.6, acc           # chance is 0.1; the unguided model's samples ignore the labels


def test_noisy_classifier_save_load(tmp_path):
    x0, y = load_digits("train")
    net, info = train_noisy_classifier(x0, y, SCHED, steps=5, width=16, depth=1)
    assert info["steps"] == 5 and not net.training
    path = save_noisy_classifier(net, info, tmp_path / "c.safetensors")
    back = load_noisy_classifier(path)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(x0[:8], t), net(x0[:8], t))
    shipped = load_noisy_classifier()
    assert shipped.info["test_accuracy_at_t"]["0"] > 0.9 and "command" in shipped.info
    with pytest.raises(FileNotFoundError):
        load_noisy_classifier(tmp_path / "missing.safetensors")
    # integrity: the card's SHA-256 is checked, then every tensor's finiteness
    from safetensors.torch import save_file

    from simple_diffusion.training import CheckpointError
    assert len(json.loads(path.with_suffix(".json").read_text())["sha256"]) == 64
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256|sha256"):
        load_noisy_classifier(path)
    bad = {k: torch.full_like(v, float("nan")) for k, v in net.state_dict().items()}
    nan_path = save_noisy_classifier(net, info, tmp_path / "n.safetensors")
    save_file(bad, str(nan_path))
    card = json.loads(nan_path.with_suffix(".json").read_text())
    del card["sha256"]  # an older user file without a hash: still refused for NaN
    nan_path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="NaN"):
        load_noisy_classifier(nan_path)


def test_every_sampler_and_both_guidances():
    lab = torch.tensor([0, 1, 2, 0, 1, 2])
    for sampler in SAMPLERS:
        xs = guided_sample(ORACLE, SCHED, (6, 2), lab, 1.0, classifier=exact_log_p, classifier_scale=0.5,
                           sampler=sampler, steps=8, generator=torch.Generator().manual_seed(0))
        assert xs.shape == (6, 2) and torch.isfinite(xs).all()
    xs = guided_sample(UNCOND, SCHED, (6, 2), lab, classifier=exact_log_p, classifier_scale=1.0, steps=8,
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(xs).all()


def test_bad_input():
    lab = torch.tensor([0, 1, 2, 0])
    cases = [
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), torch.tensor([0, 1, 2, 3])), "labels"),   # 3 = the null label
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), torch.tensor([0, 1, -1, 0])), "labels"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab[:3]), "labels"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab.double()), "labels"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), [0, 1, 2, 0]), "labels"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, -0.1), "guidance"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, float("nan")), "guidance"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, float("inf")), "guidance"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, True), "guidance"),
        (lambda: guided_sample(UNCOND, SCHED, (4, 2), lab, 1.0), "guidance"),
        (lambda: guided_sample(UNCOND, SCHED, (4, 2), lab), "labels"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, classifier_scale=1.0), "classifier"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, classifier=exact_log_p, classifier_scale=-1.0),
         "classifier_scale"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, model_kwargs={"y": lab}), "model_kwargs"),
        (lambda: guided_sample(ORACLE, SCHED, (), lab), "shape"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, null_class=-1), "null_class"),
        (lambda: guided_sample(ORACLE, SCHED, (4, 2), lab, 1.0, sampler="euler"), "sampler"),
        (lambda: ClassifierFreeGuidance(UNCOND, 1.0), "null_class"),
        (lambda: ClassifierFreeGuidance(ORACLE, -1.0), "guidance"),
        (lambda: ClassifierFreeGuidance(ORACLE, 1.0)(*points(4)[:2], lab[:3]), "y"),
        (lambda: ClassifierGuidance(UNCOND, exact_log_p, "cosine", 1.0), "schedule"),
        (lambda: ClassifierGuidance(UNCOND, exact_log_p, SCHED, float("nan")), "scale"),
        (lambda: ClassifierGuidance(UNCOND, exact_log_p, SCHED, 1.0, "score"), "prediction"),
        (lambda: ClassifierGuidance(UNCOND, None, SCHED, 1.0), "classifier"),
        (lambda: ORACLE(*points(4)[:2], torch.tensor([0, 4, 1, 2])), "y"),
        (lambda: guidance_scale(-1), "w"),
        (lambda: guidance_weight(0.5), "scale"),
        (lambda: NoisyClassifier((2,), 1), "num_classes"),
        (lambda: train_noisy_classifier(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), SCHED), "labels"),
        (lambda: train_noisy_classifier(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), SCHED, steps=0), "steps"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def test_guidance_on_an_unconditional_unet_is_refused():
    model, sched, _ = load("digits")
    with pytest.raises(ValueError, match="guidance"):
        guided_sample(model, sched, (2, 1, 8, 8), torch.tensor([3, 4]), 2.0)


def test_sample_takes_labels_and_guidance_directly(digits_cond):
    "sample(..., y=, guidance=) is guided_sample: the same draws bit for bit, and the same checks."
    model, sched, _ = digits_cond
    y = torch.arange(4)
    kw = dict(sampler="ddim", steps=3, clip_denoised=True)
    a = sample(model, sched, (4, 1, 8, 8), y=y, guidance=1.5, generator=torch.Generator().manual_seed(5), **kw)
    wrapped = ClassifierFreeGuidance(model, 1.5)
    b = sample(wrapped, sched, (4, 1, 8, 8), generator=torch.Generator().manual_seed(5), model_kwargs={"y": y}, **kw)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs class labels y"):
        sample(model, sched, (4, 1, 8, 8), guidance=1.0, **kw)
    with pytest.raises(ValueError, match="not both"):
        sample(model, sched, (4, 1, 8, 8), y=y, model_kwargs={"y": y}, **kw)
    with pytest.raises(ValueError, match="guidance"):
        sample(model, sched, (4, 1, 8, 8), y=y, guidance=-1.0, **kw)
