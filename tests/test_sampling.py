"""Contracts of simple_diffusion.sampling: spacings, respacing, the three samplers against the exact denoiser, options, bad input."""
import math

import pytest
import torch

from simple_diffusion.data import toy_mixture
from simple_diffusion.nets import MLPDenoiser, make_unet
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.parameterization import x0_eps_from_output
from simple_diffusion.sampling import (SAMPLERS, SPACINGS, SpacedSchedule, Trajectory, ddim_sigma, dpmpp2m_step, ddim_step,
                                       dynamic_threshold, mmd2_rbf, respace, sample, space_timesteps)
from simple_diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


SCHED = NoiseSchedule.from_name("cosine", 1000)
MIX = toy_mixture("gmm8")
ORACLE = GaussianMixtureOracle(MIX, SCHED)

# the documented table (T = 1000, S = 10), written out by hand from diffusers' definitions
DOCUMENTED = {"linspace": [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
              "leading": [0, 100, 200, 300, 400, 500, 600, 700, 800, 900],
              "trailing": [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]}


@pytest.mark.parametrize("spacing", SPACINGS)
def test_space_timesteps_documented(spacing):
    assert space_timesteps(1000, 10, spacing).tolist() == DOCUMENTED[spacing]
    for S in (1, 7, 50, 1000):
        ts = space_timesteps(1000, S, spacing)
        assert ts.dtype == torch.long and len(ts) == S and bool((ts.diff() > 0).all()) and 0 <= ts[0] and ts[-1] <= 999
    assert space_timesteps(1000, 1000, spacing).tolist() == list(range(1000))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_space_timesteps_match_diffusers(spacing):
    diffusers = pytest.importorskip("diffusers")
    for T, S in ((1000, 10), (1000, 50), (1000, 3), (1000, 7), (200, 13)):
        d = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        d.set_timesteps(S)
        assert d.timesteps.flip(0).tolist() == space_timesteps(T, S, spacing).tolist(), (T, S)


def test_respaced_schedule():
    for spacing in SPACINGS:
        sp = respace(SCHED, 25, spacing)
        assert isinstance(sp, SpacedSchedule) and sp.num_timesteps == 25
        assert torch.allclose(sp.alphas_cumprod, SCHED.alphas_cumprod[sp.timesteps], rtol=1e-10, atol=1e-15)
        assert sp.alphas_cumprod_prev[0] == 1
        sig2 = torch.tensor([ddim_sigma(a, p, 1.0) ** 2 for a, p in zip(sp.alphas_cumprod.tolist(), sp.alphas_cumprod_prev.tolist())], dtype=torch.float64)
        assert torch.allclose(sig2, sp.posterior_variance, rtol=1e-10, atol=0)          # DDIM's σ(η=1)² = β̃ of the respaced schedule
    full = respace(SCHED, 1000, "trailing")
    assert torch.allclose(full.betas, SCHED.betas, rtol=1e-12) and torch.equal(full.timesteps, torch.arange(1000))
    inner = SpacedSchedule(respace(SCHED, 10, "leading"), torch.tensor([1, 4, 9]))     # respacing composes the maps
    assert inner.timesteps.tolist() == [100, 400, 900]
    assert respace(SCHED, 10).to("cpu").timesteps.tolist() == DOCUMENTED["leading"]           # the default spacing


def test_ddim_eta0_is_deterministic_given_noise():
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    a = sample(ORACLE, SCHED, x_T.shape, "ddim", 20, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = sample(ORACLE, SCHED, x_T.shape, "ddim", 20, noise=x_T, generator=torch.Generator().manual_seed(2), batch_size=64)
    assert torch.allclose(a, b, atol=1e-6)
    c = sample(ORACLE, SCHED, x_T.shape, "ddim", 20, noise=x_T + 0.1)
    assert (a - c).abs().max() > 1e-3                                                      # ...and does depend on x_T
    d = sample(ORACLE, SCHED, x_T.shape, "ddim", 20, eta=0.5, noise=x_T, generator=torch.Generator().manual_seed(1))
    assert (a - d).abs().max() > 1e-3                                                      # η > 0 is stochastic


def test_ddim_eta1_equals_ddpm_step_for_step():
    "Same x_T and generator: DDIM(η=1) and DDPM (fixed_small) consume the same noise and must agree (float64)."
    x_T = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (10, 100):
        a = sample(ORACLE, SCHED, x_T.shape, "ddim", steps, eta=1.0, noise=x_T, generator=torch.Generator().manual_seed(3))
        b = sample(ORACLE, SCHED, x_T.shape, "ddpm", steps, noise=x_T, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(a, b, atol=1e-8), steps


def test_ddim_eta1_matches_ddpm_in_distribution():
    "All T steps, independent seeds: MMD² between the two sample sets within the true-vs-true noise floor (mean + 5 sd of 6 pairs)."
    sched = NoiseSchedule.from_name("cosine", 100)
    oracle = GaussianMixtureOracle(MIX, sched)
    N = 1500
    a = sample(oracle, sched, (N, 2), "ddim", 100, eta=1.0, generator=torch.Generator().manual_seed(10))
    b = sample(oracle, sched, (N, 2), "ddpm", 100, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(0)
    floor = torch.tensor([mmd2_rbf(MIX.sample(N, g)[0], MIX.sample(N, g)[0]) for _ in range(6)])
    assert mmd2_rbf(a, b) < float(floor.mean() + 5 * floor.std())
    ll_a, ll_b = MIX.log_prob(a.double()), MIX.log_prob(b.double())
    se = math.sqrt(ll_a.var() / N + ll_b.var() / N)
    assert abs(float(ll_a.mean() - ll_b.mean())) < 5 * se


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_recovers_the_mixture(sampler):
    """With the exact denoiser, 50 steps (DDPM: 200): MMD² < 3e-3 (the noise floor at N=2000 is ~1e-3; measured 1.3e-3 to 2.2e-3
    at 50 NFE) and mean log p within 0.4 nats of -H(p) (measured 0.15 to 0.35 above it); 3 steps must fail the MMD bound."""
    N = 2000
    g = torch.Generator().manual_seed(0)
    ref = MIX.sample(N, g)[0]
    neg_entropy = float(MIX.log_prob(MIX.sample(50_000, g)[0]).mean())
    x = sample(ORACLE, SCHED, (N, 2), sampler, 200 if sampler == "ddpm" else 50, generator=torch.Generator().manual_seed(1))
    assert x.shape == (N, 2) and x.dtype == torch.float32
    assert mmd2_rbf(x, ref) < 3e-3
    assert abs(float(MIX.log_prob(x.double()).mean()) - neg_entropy) < 0.4
    bad = sample(ORACLE, SCHED, (N, 2), sampler, 3, generator=torch.Generator().manual_seed(1))
    assert mmd2_rbf(bad, ref) > 3e-3


def test_predictions_agree():
    "An x0- or v-predicting exact model gives the eps model's deterministic samples."
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(ORACLE, SCHED, x_T.shape, "dpmpp2m", 15, noise=x_T)
    for pred in ("x0", "v"):
        other = sample(GaussianMixtureOracle(MIX, SCHED, prediction=pred), SCHED, x_T.shape, "dpmpp2m", 15, noise=x_T, prediction=pred)
        assert torch.allclose(ref, other, atol=1e-8), pred


def test_steps_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)
    ab, abp = 0.3, 0.6
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    # DDIM η=0 and DPM-Solver++ first order are the same step; second order with r = 1 adds (x̂0 - x̂0_last)/2
    assert torch.allclose(ddim_step(x, x0, eps, ab, abp), dpmpp2m_step(x, x0, ab, abp), atol=1e-12)
    lam = lambda a: 0.5 * math.log(a / (1 - a))
    ab_last = 1 / (1 + math.exp(-2 * (2 * lam(ab) - lam(abp))))                         # h_last = h, so r = 1
    x0_last = torch.randn(10, 3, generator=g, dtype=torch.float64)
    D = 1.5 * x0 - 0.5 * x0_last
    assert torch.allclose(dpmpp2m_step(x, x0, ab, abp, x0_last, ab_last), dpmpp2m_step(x, D, ab, abp), atol=1e-12)
    with pytest.raises(ValueError, match="noise is required"): ddim_step(x, x0, eps, ab, abp, eta=0.5)


def test_threshold_and_clip():
    big = torch.linspace(-3, 3, 64).reshape(1, 1, 8, 8)
    th = dynamic_threshold(big, 0.9)
    assert th.abs().max() <= 1 + 1e-6 and torch.equal(dynamic_threshold(big * 0.2, 0.9), big * 0.2)
    with pytest.raises(ValueError, match="percentile"): dynamic_threshold(big, 0)
    model = lambda x, t: torch.full_like(x, 3.0)                                         # x̂_0 = 3 everywhere
    for kw in (dict(clip_denoised=True), dict(threshold=0.995)):
        x = sample(model, SCHED, (4, 1, 8, 8), "ddim", 5, prediction="x0", **kw)
        assert x.abs().max() <= 1 + 1e-5, kw
    assert sample(model, SCHED, (4, 1, 8, 8), "ddim", 5, prediction="x0").abs().max() > 2.9


def test_trajectory_progress_and_model_kwargs():
    x, traj = sample(ORACLE, SCHED, (50, 2), "ddim", 8, return_trajectory=True, batch_size=20, progress=True)
    assert isinstance(traj, Trajectory) and traj.x.shape == (9, 50, 2) and traj.pred_x0.shape == (8, 50, 2)
    assert torch.equal(traj.x[-1], x) and traj.timesteps.tolist() == space_timesteps(1000, 8).flip(0).tolist()
    y = torch.arange(90) % 8                                                              # labels are chunked with the batch
    xc = sample(ORACLE, SCHED, (90, 2), "dpmpp2m", 20, model_kwargs={"y": y}, batch_size=32, generator=torch.Generator().manual_seed(0))
    assert (MIX.component_log_prob(xc.double()).argmax(1) == y).all()


def test_real_networks_and_learned_range():
    torch.manual_seed(0)
    mlp = MLPDenoiser(2, learn_sigma=True)
    torch.nn.init.normal_(mlp.out[-1].weight, std=0.1)
    for sampler in SAMPLERS:
        x = sample(mlp, SCHED, (16, 2), sampler, 10, variance="learned_range", generator=torch.Generator().manual_seed(0))
        assert x.shape == (16, 2) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"model output must have shape \(16, 2\)"):
        sample(mlp, SCHED, (16, 2), "ddpm", 10)          # [B, 2D] from a learn_sigma model needs variance='learned_range'


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cosine_T1000_is_finite(dtype):
    """The network runs in low precision, the sampler's arithmetic in float32 with float64 coefficients: finite for every sampler,
    with the default spacing and, for images with clip_denoised, from the last step (√ᾱ_T ≈ 5e-5). (Without clipping, an untrained
    ε-network started at T produces states of size ~1e4, which float16 activations cannot hold: bfloat16 can.)"""
    torch.manual_seed(0)
    mlp = MLPDenoiser(2)
    torch.nn.init.normal_(mlp.out[-1].weight, std=0.1)                                  # a non-trivial (untrained) ε-predictor
    net = make_unet("digits", base_channels=16).eval()
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    spacings = ("leading", "trailing") if dtype == torch.bfloat16 else ("leading",)
    with torch.autocast("cpu", dtype=dtype):
        assert mlp(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)).dtype == dtype      # autocast is really on
        for sampler in SAMPLERS:
            for spacing in spacings:
                x = sample(mlp, SCHED, (32, 2), sampler, 10, spacing=spacing, generator=torch.Generator().manual_seed(0))
                assert x.dtype == torch.float32 and torch.isfinite(x).all(), (sampler, spacing)
        x = sample(net, SCHED, (2, 1, 8, 8), "dpmpp2m", 2, spacing="trailing", clip_denoised=True, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_device(device):
    net = MLPDenoiser(2).to(device)
    x = sample(net, SCHED, (8, 2), "dpmpp2m", 5, generator=torch.Generator(device).manual_seed(0))
    assert x.device.type == device.type
    xo = sample(ORACLE, SCHED, (8, 2), "ddpm", 5, device=device)                        # a parameterless callable: device=
    assert xo.device.type == device.type


@pytest.mark.gpu
def test_cuda_matches_cpu_for_ddim():
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample(ORACLE, SCHED, x_T.shape, "ddim", 20, noise=x_T)
    b = sample(ORACLE, SCHED, x_T.shape, "ddim", 20, noise=x_T.cuda(), device="cuda")
    assert torch.allclose(a, b.cpu(), atol=1e-8)


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=1001), r"steps must be an integer in \[1, 1000\]"), (dict(steps=0), "steps"), (dict(steps=True), "steps"),
    (dict(sampler="ddim", eta=-0.1), r"eta must be a number in \[0, 1\]"), (dict(sampler="ddim", eta=1.01), "eta"),
    (dict(eta=0.5), "eta applies to sampler='ddim' only"), (dict(sampler="heun"), "sampler must be one of"),
    (dict(spacing="uniform"), "spacing must be one of"), (dict(prediction="score"), "prediction"), (dict(variance="x"), "variance"),
    (dict(clip_denoised=True, threshold=0.9), "not both"), (dict(noise=torch.zeros(5, 2)), "noise must be"),
    (dict(batch_size=0), "batch_size"), (dict(model_kwargs=3), "model_kwargs"), (dict(threshold=2.0), "percentile"),
])
def test_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample(ORACLE, SCHED, (4, 2), **{"sampler": "ddpm", "steps": 10, **kw})


def test_bad_input_elsewhere():
    with pytest.raises(ValueError, match="shape"): sample(ORACLE, SCHED, (0, 2), "ddim", 5)
    with pytest.raises(ValueError, match="schedule must be a NoiseSchedule"): sample(ORACLE, "cosine", (4, 2))
    with pytest.raises(ValueError, match="zero terminal SNR"): sample(ORACLE, NoiseSchedule(torch.tensor([0.5, 1.0])), (4, 2), "ddim")
    with pytest.raises(ValueError, match="steps"): space_timesteps(10, 11)
    with pytest.raises(ValueError, match="strictly increasing"): SpacedSchedule(SCHED, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="device="):
        sample(MLPDenoiser(2), SCHED, (4, 2), "ddim", 5, device="meta")
    with pytest.raises(ValueError, match="bandwidth"): mmd2_rbf(torch.zeros(3, 2), torch.zeros(3, 2), 0)


def test_predict_matches_parameterization():
    "The sampler's float-coefficient conversion agrees with x0_eps_from_output (float64)."
    from simple_diffusion.sampling import _predict
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    for t in (0, 400, 999):
        tt = torch.full((6,), t)
        a, s = math.sqrt(float(SCHED.alphas_cumprod[t])), math.sqrt(1 - float(SCHED.alphas_cumprod[t]))
        for pred in ("eps", "x0", "v"):
            mine = _predict(lambda x_, t_: out, x, tt, a, s, pred, False, None, False, {})[:2]
            for m, r in zip(mine, x0_eps_from_output(SCHED, x, tt, out, pred)):
                assert torch.allclose(m, r, rtol=1e-9, atol=1e-9 * float(r.abs().max()))
