"""Contracts of simple_diffusion.oracle: the exact denoiser of Gaussian-mixture data."""
import math

import pytest
import torch
from scipy.integrate import quad

from simple_diffusion.data import GaussianMixture, toy_mixture
from simple_diffusion.forward import q_sample
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.parameterization import PREDICTIONS
from simple_diffusion.schedules import NoiseSchedule

SCHED = NoiseSchedule.from_name("cosine", 1000)
# 3-D, diagonal and unequal standard deviations, unequal weights
MIX3 = GaussianMixture(means=[[-1.0, 0.5, 0.0], [1.5, -0.5, 1.0], [0.0, 2.0, -1.0]],
                       stds=[[0.2, 0.6, 0.3], [0.5, 0.1, 0.4], [0.3, 0.3, 0.3]], weights=[0.5, 0.3, 0.2])


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(prediction, dtype):
    orc = GaussianMixtureOracle(MIX3, SCHED, prediction=prediction)
    x = torch.randn(6, 3, dtype=dtype)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    out = orc(x, t)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert orc.score(x, t).shape == x.shape and orc.score(x, t).dtype == dtype
    m, v = orc.posterior_x0(x, t)
    assert m.shape == v.shape == x.shape and (v >= 0).all()
    assert orc.log_prob_xt(x, t).shape == (6,) and orc.log_prob_xt(x, t).dtype == torch.float64
    r = orc.responsibilities(x, t)
    assert r.shape == (6, 3) and torch.allclose(r.sum(1), torch.ones(6, dtype=torch.float64))
    lr = GaussianMixtureOracle(MIX3, SCHED, prediction=prediction, learned_range=True)(x, t)
    assert lr.shape == (6, 6) and torch.allclose(lr[:, :3], out) and (lr[:, 3:].abs() <= 1).all()


def test_image_shaped_input():
    mix = GaussianMixture(torch.randn(4, 2 * 3 * 3, dtype=torch.float64), torch.full((4,), 0.3))
    orc = GaussianMixtureOracle(mix, SCHED, learned_range=True)
    x = torch.randn(5, 2, 3, 3)
    t = torch.arange(5) * 200
    out = orc(x, t)
    assert out.shape == (5, 4, 3, 3)
    flat = GaussianMixtureOracle(mix, SCHED)(x.reshape(5, -1), t)
    assert torch.allclose(out[:, :2].reshape(5, -1), flat)


def test_posterior_mean_vs_importance_sampling():
    """E[x0 | x_t] within 5 standard errors of a self-normalised importance-sampling estimate."""
    orc = GaussianMixtureOracle(MIX3, SCHED)
    gen = torch.Generator().manual_seed(0)
    pool, _ = MIX3.sample(200_000, generator=gen)
    for tc in (250, 450, 700):
        x0, _ = MIX3.sample(4, generator=gen)
        t = torch.full((4,), tc)
        xt = q_sample(SCHED, x0, t, noise=torch.randn(4, 3, generator=gen, dtype=torch.float64))
        a, b2 = float(SCHED.sqrt_alphas_cumprod[tc]), 1 - float(SCHED.alphas_cumprod[tc])
        logw = -0.5 * ((xt[:, None] - a * pool) ** 2).sum(-1) / b2
        w = (logw - logw.max(1, keepdim=True).values).exp()
        m = w @ pool / w.sum(1, keepdim=True)
        se = torch.sqrt(torch.einsum("jn,jnd->jd", w**2, (pool[None] - m[:, None]) ** 2)) / w.sum(1, keepdim=True)
        assert (w.sum(1) ** 2 / (w**2).sum(1)).min() > 200
        z = (orc.posterior_x0(xt, t)[0] - m).abs() / se
        assert z.max() < 5, (tc, z)


def test_log_prob_xt_vs_quadrature_1d():
    mix = GaussianMixture(means=[[-2.0], [0.5], [3.0]], stds=[0.3, 1.0, 0.5], weights=[0.2, 0.5, 0.3])
    orc = GaussianMixtureOracle(mix, SCHED)
    pdf0 = lambda v: float(mix.log_prob(torch.tensor([[v]], dtype=torch.float64)).exp())
    for tc in (0, 200, 600, 999):
        abar = float(SCHED.alphas_cumprod[tc]); a, b = math.sqrt(abar), math.sqrt(1 - abar)
        for xt in (-2.0, 0.0, 2.5):
            kern = lambda x0: pdf0(x0) * math.exp(-0.5 * ((xt - a * x0) / b) ** 2) / (b * math.sqrt(2 * math.pi))
            pts = sorted({-12.0, -2.0, 0.5, 3.0, 14.0, xt / a} if abs(xt / a) < 12 else {-12.0, -2.0, 0.5, 3.0, 14.0})
            q = sum(quad(kern, lo, hi, limit=200, epsabs=1e-14)[0] for lo, hi in zip(pts[:-1], pts[1:]))
            m = sum(quad(lambda x0: x0 * kern(x0), lo, hi, limit=200, epsabs=1e-14)[0] for lo, hi in zip(pts[:-1], pts[1:])) / q
            x = torch.tensor([[xt]], dtype=torch.float64); t = torch.tensor([tc])
            assert abs(float(orc.log_prob_xt(x, t).exp()) / q - 1) < 1e-7
            assert abs(float(orc.posterior_x0(x, t)[0]) - m) < 1e-7 * (1 + abs(m))


def test_score_is_gradient_and_tweedie():
    orc = GaussianMixtureOracle(MIX3, SCHED)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 3, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randint(0, 1000, (32,), generator=gen)
    (g,) = torch.autograd.grad(orc.log_prob_xt(x, t).sum(), x)
    x = x.detach()
    s = orc.score(x, t)
    assert torch.allclose(s, g, rtol=1e-9, atol=1e-9)
    a, b = SCHED.gather("sqrt_alphas_cumprod", t, x), SCHED.gather("sqrt_one_minus_alphas_cumprod", t, x)
    x0 = orc.posterior_x0(x, t)[0]
    assert torch.allclose(x0, (x + b**2 * s) / a, rtol=1e-9, atol=1e-9)
    eps = GaussianMixtureOracle(MIX3, SCHED, "eps")(x, t)
    v = GaussianMixtureOracle(MIX3, SCHED, "v")(x, t)
    assert torch.allclose(eps, -b * s, rtol=1e-9, atol=1e-9)
    assert torch.allclose(GaussianMixtureOracle(MIX3, SCHED, "x0")(x, t), x0)
    assert torch.allclose(v, a * eps - b * x0, atol=1e-12)
    assert torch.allclose(a * x - b * v, x0, atol=1e-9)          # x0 = a x_t - b v since a² + b² = 1


def test_marginal_matches_log_prob_xt():
    orc = GaussianMixtureOracle(MIX3, SCHED)
    x = torch.randn(10, 3, dtype=torch.float64)
    for tc in (0, 400, 999):
        assert torch.allclose(orc.marginal(tc).log_prob(x), orc.log_prob_xt(x, torch.full((10,), tc)), rtol=1e-12)


def test_learned_range_limits():
    """Standard-normal data: the exact reverse variance is β_t, the top of the range (v = +1)."""
    mix = GaussianMixture(torch.zeros(1, 2), torch.ones(1))
    for name in ("linear", "cosine"):
        s = NoiseSchedule.from_name(name, 1000)
        out = GaussianMixtureOracle(mix, s, learned_range=True)(torch.randn(50, 2), torch.arange(0, 1000, 20))
        assert torch.allclose(out[:, 2:], torch.ones(50, 2), atol=1e-5)
    # nearly deterministic data: the reverse variance is the posterior's β̃_t, the bottom (v = -1), for t >= 2
    sharp = GaussianMixture(torch.zeros(1, 2), torch.full((1,), 1e-6))
    out = GaussianMixtureOracle(sharp, SCHED, learned_range=True)(torch.randn(50, 2, dtype=torch.float64), torch.arange(1, 1000, 20))
    assert torch.allclose(out[:, 2:], -torch.ones(50, 2, dtype=torch.float64), atol=1e-4)


def test_class_conditional():
    mix = toy_mixture("gmm8")
    orc = GaussianMixtureOracle(mix, SCHED)
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 300)
    y = torch.arange(8)
    one = GaussianMixture(mix.means[2:3], mix.stds[2:3])
    assert torch.allclose(orc.score(x, t, y)[2], GaussianMixtureOracle(one, SCHED).score(x[2:3], t[:1])[0], atol=1e-12)
    assert torch.allclose(orc(x, t, y=y)[2], GaussianMixtureOracle(one, SCHED)(x[2:3], t[:1])[0], atol=1e-12)


@pytest.mark.parametrize("call, word", [
    (lambda o: GaussianMixtureOracle(MIX3, SCHED, prediction="score"), "prediction"),
    (lambda o: GaussianMixtureOracle("gmm8", SCHED), "mixture"),
    (lambda o: GaussianMixtureOracle(MIX3, None), "schedule"),
    (lambda o: o(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), "x_t"),
    (lambda o: o(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)), "x_t"),
    (lambda o: o(torch.zeros(4, 3), torch.full((4,), 1000)), "t must lie"),
    (lambda o: o(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long)), "B=4"),
    (lambda o: o(torch.zeros(4, 3), torch.zeros(4)), "integer"),
    (lambda o: o(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), y=torch.tensor([0, 1, 2, 3])), "y"),
    (lambda o: o.marginal(1000), "t must lie"),
])
def test_bad_input(call, word):
    orc = GaussianMixtureOracle(MIX3, SCHED)
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        call(orc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_input():
    orc = GaussianMixtureOracle(MIX3, SCHED.to("cuda"), learned_range=True)
    x = torch.randn(8, 3, device="cuda")
    t = torch.arange(8, device="cuda") * 100
    out = orc(x, t)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), GaussianMixtureOracle(MIX3, SCHED, learned_range=True)(x.cpu(), t.cpu()), atol=1e-5)
