"""The bad-input suite: every public entry point refuses bad arguments with an exception whose message
names the argument. Each case: (the call, the exception type, a fragment of the message)."""
import atexit
import re

import pytest
import torch

from simple_diffusion.core import check_choice, check_int, check_number, check_tensor, make_grid, noise_like
from simple_diffusion.data import GaussianMixture, load_digits, make_toy, toy_mixture
from simple_diffusion.elbo import discretized_gaussian_log_likelihood, elbo_bpd, hybrid_loss, normal_kl, simple_loss, vb_terms_bpd
from simple_diffusion.forward import q_mean_variance, q_sample, q_step
from simple_diffusion.nets import MLPDenoiser, UNet, build_model, make_unet, timestep_embedding
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.parameterization import eps_from_v, p_mean_variance, v_from_x0_eps, x0_eps_from_output, x0_from_eps
from simple_diffusion.posterior import q_posterior_mean_variance
from simple_diffusion.schedules import NoiseSchedule, get_beta_schedule, linear_betas
from simple_diffusion.training import CheckpointError, TrainConfig
from simple_diffusion.metrics import evaluate_samples, load_digits_classifier, mmd2_rbf
from simple_diffusion.pretrained import load, sha256_file, weights_dir
from simple_diffusion.schedules import cosine_betas, quadratic_betas, shifted_cosine_betas, sigmoid_betas

COS = NoiseSchedule.from_name("cosine", 1000)
LIN = NoiseSchedule.from_name("linear", 1000)
S100 = NoiseSchedule.from_name("cosine", 100)
X = torch.zeros(4, 3, 5, 5)
Z = torch.zeros(4, 1, 8, 8)
T4 = torch.tensor([0, 1, 500, 999])
LONG4 = torch.zeros(4, dtype=torch.long)
MIX25 = toy_mixture("gmm25")
ORC25 = GaussianMixtureOracle(MIX25, COS)
TT5 = torch.tensor([0, 1, 2, 500, 999])
EPS = lambda x, t, y=None: torch.zeros_like(x)
IDENT = lambda x, t: x
UNET = make_unet("digits", num_classes=10)
MLP = MLPDenoiser(2)

NAN, INF = float("nan"), float("inf")


def _tampered(kind, name="gmm8"):
    "A fresh copy of a shipped card and its weights in a temporary folder, spoilt in one way; the folder."
    import json
    import shutil
    import tempfile
    from pathlib import Path
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    d = Path(tempfile.mkdtemp(prefix="tampered-"))
    for suffix in (".json", ".safetensors"):
        shutil.copy(weights_dir() / f"{name}{suffix}", d)
    card_file, w = d / f"{name}.json", d / f"{name}.safetensors"
    info = json.loads(card_file.read_text())
    if kind == "byte":
        raw = bytearray(w.read_bytes())
        raw[len(raw) // 2] ^= 1
        w.write_bytes(bytes(raw))
    elif kind == "truncated":
        w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
        info["sha256"] = sha256_file(w)
    elif kind == "nan":
        with safe_open(str(w), "pt") as f:
            meta = f.metadata()
        sd = load_file(w)
        sd = {k: v * NAN for k, v in sd.items()}
        save_file(sd, w, metadata=meta)
        info["sha256"] = sha256_file(w)
    elif kind == "no_hash":
        del info["sha256"]
    elif kind == "T10":
        info["train_config"]["num_timesteps"] = 10
    elif kind == "shape":
        info["data_shape"] = [3]
    elif kind == "huge":
        info["train_config"]["model_kwargs"] = {"hidden": 1_000_000}
    card_file.write_text(json.dumps(info))
    atexit.register(shutil.rmtree, d, True)
    return d


def _tampered_classifier():
    import json
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="tampered-"))
    for suffix in (".json", ".safetensors"):
        shutil.copy(weights_dir() / f"digits_classifier{suffix}", d)
    atexit.register(shutil.rmtree, d, True)
    w = d / "digits_classifier.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    card = json.loads(w.with_suffix(".json").read_text())
    card["sha256"] = sha256_file(w)
    w.with_suffix(".json").write_text(json.dumps(card))
    return w


CASES = [
    # core
    (lambda: check_int(True, "steps", 1), ValueError, "steps must be an integer"),
    (lambda: check_int(2.0, "n"), ValueError, "n must be an integer"),
    (lambda: check_number(float("inf"), "lr", 0), ValueError, "lr must be a finite number"),
    (lambda: check_choice("ddin", ("ddim",), "sampler"), ValueError, "sampler must be one of"),
    (lambda: check_tensor([1.0], "x0"), ValueError, "x0 must be a tensor"),
    (lambda: noise_like(torch.zeros(2), torch.zeros(3)), ValueError, "noise must have shape"),
    (lambda: noise_like(torch.zeros(3, dtype=torch.long), torch.zeros(3)), ValueError, "noise must be a floating-point"),
    (lambda: make_grid(torch.zeros(3, 8, 8)), ValueError, "images must be [B, C, H, W]"),
    # data
    (lambda: load_digits(split="val"), ValueError, "split"),
    (lambda: load_digits(test_fraction=1.0), ValueError, "test_fraction"),
    (lambda: load_digits(pad=-1), ValueError, "pad"),
    (lambda: load_digits(size=0), ValueError, "size"),
    (lambda: make_toy("spiral", 10), ValueError, "moons"),
    (lambda: make_toy("moons", 0), ValueError, "n must be"),
    (lambda: GaussianMixture(torch.zeros(3), torch.ones(3)), ValueError, "means must be [K, D]"),
    (lambda: GaussianMixture(torch.zeros(3, 2), -torch.ones(3)), ValueError, "stds"),
    (lambda: MIX25.sample(0), ValueError, "n must be"),
    # schedules
    (lambda: linear_betas(10), ValueError, "beta_end"),
    (lambda: get_beta_schedule("cosin", 100), ValueError, "linear"),
    (lambda: get_beta_schedule("cosine", 0), ValueError, "num_timesteps"),
    (lambda: get_beta_schedule("cosine", 2.5), ValueError, "num_timesteps"),
    (lambda: NoiseSchedule([0.1, 1.2]), ValueError, "(0, 1)"),
    (lambda: NoiseSchedule([0.0, 0.1]), ValueError, "(0, 1)"),
    (lambda: NoiseSchedule([0.5, 1.0, 0.5]), ValueError, "(0, 1)"),
    (lambda: NoiseSchedule(torch.full((2, 3), 0.1)), ValueError, "1-D"),
    (lambda: NoiseSchedule([0.1, float("nan")]), ValueError, "finite"),
    (lambda: get_beta_schedule("shifted_cosine", 100, image_size=0), ValueError, "image_size"),
    (lambda: COS.gather("betas", torch.tensor([0, 1000, 3, 4]), X), ValueError, "[0, 999]"),
    (lambda: COS.gather("betas", torch.ones(4, dtype=torch.uint8), X), ValueError, "t must be an integer tensor"),
    (lambda: COS.gather("betas", torch.ones(4, dtype=torch.bool), X), ValueError, "t must be an integer tensor"),
    (lambda: COS.gather("alphas_bar", T4, X), ValueError, "table must be one of"),
    (lambda: COS.check_t(torch.tensor([-1])), ValueError, "[0, 999]"),
    # forward
    (lambda: q_sample(COS, X, torch.tensor([0, 1, 2, 1000])), ValueError, "[0, 999]"),
    (lambda: q_sample(COS, X, torch.tensor([0, 1, 2])), ValueError, "B=4"),
    (lambda: q_sample(COS, X, torch.zeros(4)), ValueError, "integer"),
    (lambda: q_sample(COS, X, LONG4, noise=torch.zeros(4, 3, 5)), ValueError, "noise"),
    (lambda: q_sample(COS, X.long(), LONG4), ValueError, "x0"),
    (lambda: q_step(COS, torch.zeros(4, 2, dtype=torch.long), LONG4), ValueError, "x_prev"),
    (lambda: q_mean_variance(COS, [0.0] * 4, LONG4), ValueError, "x0"),
    # posterior
    (lambda: q_posterior_mean_variance(LIN, X, X[:, :2], T4), ValueError, "xt"),
    (lambda: q_posterior_mean_variance(LIN, X, X.double(), T4), ValueError, "xt"),
    (lambda: q_posterior_mean_variance(LIN, X.long(), X, T4), ValueError, "x0"),
    (lambda: q_posterior_mean_variance(LIN, X, X, torch.tensor([0, 1])), ValueError, "B=4"),
    # parameterization
    (lambda: p_mean_variance(EPS, LIN, X, T4, prediction="score"), ValueError, "prediction"),
    (lambda: p_mean_variance(EPS, LIN, X, T4, variance="learned"), ValueError, "variance"),
    (lambda: p_mean_variance(EPS, LIN, X, T4, variance="learned_range"), ValueError, "model output"),
    (lambda: p_mean_variance(lambda x, t: x[:, :1], LIN, X, T4), ValueError, "model output"),
    (lambda: p_mean_variance(EPS, LIN, X, torch.tensor([0, 1, 2, 1000])), ValueError, "[0, 999]"),
    (lambda: p_mean_variance(EPS, LIN, X, T4, model_kwargs=[1]), ValueError, "model_kwargs"),
    (lambda: x0_from_eps(LIN, X, T4, X[:2]), ValueError, "eps"),
    (lambda: eps_from_v(LIN, X, T4, X.double()), ValueError, "v"),
    (lambda: v_from_x0_eps(LIN, X, T4[:2], X), ValueError, "B=4"),
    (lambda: x0_eps_from_output(LIN, X, T4, X, "velocity"), ValueError, "prediction"),
    # oracle
    (lambda: GaussianMixtureOracle(MIX25, COS, prediction="score"), ValueError, "prediction"),
    (lambda: GaussianMixtureOracle(MIX25, "cosine"), ValueError, "schedule"),
    (lambda: ORC25(torch.zeros(5, 3), TT5), ValueError, "x_t"),
    (lambda: ORC25(torch.zeros(5, 2), torch.tensor([0, 1, 2, 3, 1000])), ValueError, "[0, 999]"),
    (lambda: ORC25(torch.zeros(5, 2), TT5, y=torch.tensor([0, 0, 0, 0, 25])), ValueError, "y"),
    # elbo
    (lambda: normal_kl(torch.zeros(3), torch.zeros(4), 0.0, 0.0), ValueError, "logvar1"),
    (lambda: normal_kl(0.0, 0.0, 0.0, 0.0), ValueError, "tensor"),
    (lambda: discretized_gaussian_log_likelihood(Z + 1.5, Z, torch.zeros(())), ValueError, "x must lie in [-1, 1]"),
    (lambda: discretized_gaussian_log_likelihood(Z, Z[:2], torch.zeros(())), ValueError, "means"),
    (lambda: discretized_gaussian_log_likelihood(Z, Z, torch.tensor(float("inf"))), ValueError, "log_scales"),
    (lambda: discretized_gaussian_log_likelihood(Z, Z, torch.zeros(3)), ValueError, "log_scales"),
    (lambda: elbo_bpd(IDENT, S100, Z, variance="fixed", progress=False), ValueError, "variance"),
    (lambda: elbo_bpd(IDENT, S100, Z, decoder="logistic", progress=False), ValueError, "decoder"),
    (lambda: elbo_bpd(IDENT, S100, Z, batch_timesteps=0, progress=False), ValueError, "batch_timesteps"),
    (lambda: vb_terms_bpd(IDENT, S100, Z, Z[:3], LONG4), ValueError, "xt"),
    (lambda: vb_terms_bpd(IDENT, S100, Z, Z, torch.full((4,), 100)), ValueError, "t must lie"),
    (lambda: simple_loss(IDENT, S100, Z, prediction="score"), ValueError, "prediction"),
    (lambda: simple_loss(IDENT, S100, Z, weighting="snr"), ValueError, "weighting"),
    (lambda: simple_loss(IDENT, S100, Z, min_snr_gamma=0), ValueError, "min_snr_gamma"),
    (lambda: simple_loss(IDENT, S100, Z, t=torch.full((4,), -1)), ValueError, "t must lie"),
    (lambda: simple_loss(IDENT, S100, Z, noise=torch.zeros(4, 64)), ValueError, "noise"),
    (lambda: simple_loss(lambda x, t: torch.cat([x, x], 1), S100, Z), ValueError, "hybrid_loss"),
    (lambda: hybrid_loss(IDENT, S100, Z), ValueError, "model output"),
    # nets
    (lambda: UNET(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])), ValueError, "in_channels=1"),
    (lambda: UNET(torch.randn(2, 1, 6, 6), torch.tensor([0, 1])), ValueError, "image size (6, 6)"),
    (lambda: UNET(torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 2])), ValueError, "t must"),
    (lambda: UNET(torch.randn(2, 1, 8, 8), torch.tensor([[0, 1]])), ValueError, "t must"),
    (lambda: UNET(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([0, 11])), ValueError, "[0, 10]"),
    (lambda: UNET(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([0.0, 1.0])), ValueError, "y must"),
    (lambda: MLP(torch.randn(2, 2), torch.tensor([0, 1]), y=torch.tensor([0, 1])), ValueError, "num_classes=None"),
    (lambda: MLP(torch.randn(2, 3), torch.tensor([0, 1])), ValueError, "dim=2"),
    (lambda: MLPDenoiser(2, hidden=0), ValueError, "hidden"),
    (lambda: timestep_embedding(torch.arange(3), 1), ValueError, "dim"),
    (lambda: timestep_embedding(torch.arange(3), 4.0), ValueError, "dim"),
    (lambda: make_unet("mnist", channel_mults=(1, 2, 2, 2))(torch.randn(1, 1, 28, 28), torch.tensor([0])),
     ValueError, "image size (28, 28)"),
    (lambda: make_unet("imagenet"), ValueError, "name must be one of"),
    (lambda: UNet(base_channels=12), ValueError, "num_groups=8"),
    (lambda: UNet(attention_levels=(3,)), ValueError, "attention_levels"),
    (lambda: UNet(base_channels=8, num_groups=4, num_heads=3), ValueError, "num_heads=3"),
    (lambda: build_model("mlp", (1, 8, 8)), ValueError, "model='mlp' needs vectors"),
    (lambda: build_model("digits", (2,)), ValueError, "needs images"),
    # training config
    (lambda: TrainConfig(steps=-1), ValueError, "steps"),
    (lambda: TrainConfig(lr=0), ValueError, "lr"),
    (lambda: TrainConfig(schedule="cosin"), ValueError, "schedule"),
    (lambda: TrainConfig(prediction="score"), ValueError, "prediction"),
    (lambda: TrainConfig(ema_decay=1.5), ValueError, "ema_decay"),
    (lambda: TrainConfig(schedule="linear", num_timesteps=10), ValueError, "num_timesteps"),
    (lambda: TrainConfig(seed=2**70), ValueError, "seed"),
    (lambda: TrainConfig(batch_size=True), ValueError, "batch_size"),
    (lambda: TrainConfig.from_dict({"learning_rate": 1e-3}), ValueError, "learning_rate"),
    # issue 17, item 2: integrity of the shipped weights (each a one-line CheckpointError naming the file)
    (lambda: load("gmm8", directory=_tampered("byte")), CheckpointError, "gmm8.safetensors: SHA-256"),
    (lambda: load("gmm8", directory=_tampered("no_hash")), CheckpointError, "gmm8.json: sha256 must be"),
    (lambda: load("gmm8", directory=_tampered("truncated")), CheckpointError, "gmm8.safetensors: truncated or corrupt"),
    (lambda: load("gmm8", directory=_tampered("nan")), CheckpointError, "holds NaN or Inf"),
    (lambda: load("gmm8", directory=_tampered("T10")), CheckpointError, "gmm8.json: train_config in num_timesteps differs"),
    (lambda: load("gmm8", directory=_tampered("shape")), CheckpointError, "gmm8.json: data_shape differs"),
    (lambda: load("gmm8", directory=_tampered("huge")), CheckpointError, "gmm8.json: train_config in model_kwargs"),
    (lambda: load_digits_classifier(_tampered_classifier()), CheckpointError, "digits_classifier.safetensors: truncated"),
    # issue 17, item 3: non-finite values refused at the entry points that are not the training hot path
    (lambda: cosine_betas(10, s=NAN), ValueError, "s must be a finite number"),
    (lambda: cosine_betas(10, max_beta=NAN), ValueError, "max_beta must be a finite number"),
    (lambda: linear_betas(10, beta_start=NAN), ValueError, "beta_start must be a finite number"),
    (lambda: quadratic_betas(10, beta_end=INF), ValueError, "beta_end must be a finite number"),
    (lambda: sigmoid_betas(10, beta_start=NAN), ValueError, "beta_start must be a finite number"),
    (lambda: shifted_cosine_betas(10, 32, logsnr_min=NAN), ValueError, "logsnr_min must be a finite number"),
    (lambda: shifted_cosine_betas(10, INF), ValueError, "image_size must be a finite number"),
    (lambda: get_beta_schedule("cosine", 10, s=INF), ValueError, "s must be a finite number"),
    (lambda: timestep_embedding(T4, 8, max_period=INF), ValueError, "max_period must be a finite number"),
    (lambda: timestep_embedding(T4, 8, max_period=NAN), ValueError, "max_period must be a finite number"),
    (lambda: GaussianMixture([[NAN, 0.0]], [1.0]), ValueError, "means must be finite"),
    (lambda: GaussianMixture([[0.0, 0.0]], [INF]), ValueError, "stds must be finite"),
    (lambda: GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [NAN, 1.0]), ValueError, "weights must be"),
    (lambda: ORC25(torch.full((5, 2), NAN), TT5), ValueError, "x_t must be finite"),
    (lambda: ORC25.score(torch.full((5, 2), INF), TT5), ValueError, "x_t must be finite"),
    (lambda: elbo_bpd(EPS, S100, torch.full((2, 1, 8, 8), NAN), progress=False), ValueError, "x0 must be finite"),
    (lambda: discretized_gaussian_log_likelihood(torch.full((2, 3), NAN), torch.zeros(2, 3), 0.0), ValueError, "x must lie in [-1, 1] and be finite"),
    (lambda: discretized_gaussian_log_likelihood(torch.zeros(2, 3), torch.full((2, 3), NAN), 0.0), ValueError, "means must be finite"),
    (lambda: mmd2_rbf(torch.zeros(3, 2), torch.full((3, 2), NAN)), ValueError, "y must be finite"),
    (lambda: mmd2_rbf(torch.full((3, 2), INF), torch.zeros(3, 2)), ValueError, "x must be finite"),
    (lambda: make_grid(torch.full((2, 1, 4, 4), NAN)), ValueError, "images must be finite"),
    (lambda: evaluate_samples(torch.full((4, 1, 8, 8), NAN), Z), ValueError, "samples must be non-empty and finite"),
    # issue 17, item 5: errors that name the argument
    (lambda: NoiseSchedule("abc"), ValueError, "betas must be a 1-D sequence of numbers, got the string 'abc'"),
    (lambda: NoiseSchedule([object()]), ValueError, "betas must be a 1-D sequence of numbers"),
    (lambda: elbo_bpd(EPS, S100, torch.zeros(0, 1, 8, 8), progress=False), ValueError, "x0 must hold at least one example"),
    (lambda: ORC25(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), ValueError, "x_t must be a floating-point tensor [B, ...] with B >= 1"),
    (lambda: GaussianMixture(torch.zeros(0, 2), []), ValueError, "means must be [K, D] with K, D >= 1"),
    (lambda: make_grid(torch.zeros(0, 1, 8, 8)), ValueError, "images must be [B, C, H, W] with B >= 1"),
    (lambda: make_grid(Z, nrow=0), ValueError, "nrow must be an integer in [1, inf)"),
    (lambda: make_grid(Z, padding=-1), ValueError, "padding must be an integer"),
    (lambda: make_grid(Z, pad_value=NAN), ValueError, "pad_value must be a finite number"),
    (lambda: evaluate_samples((Z + 1) * 127.5, Z), ValueError, "samples must be images on the [-1, 1] scale"),
    (lambda: evaluate_samples(Z, (Z + 1) * 127.5), ValueError, "reference must be real images in [-1, 1]"),
    (lambda: discretized_gaussian_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), 0.0), ValueError, "means must be on x's device"),
]


@pytest.mark.parametrize("call, exc, fragment", CASES, ids=[f"{i:03d}-{c[2][:24]}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_by_name(call, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        call()


def test_the_suite_is_large():
    assert len(CASES) >= 60
