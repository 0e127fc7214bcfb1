"""Contracts of simple_diffusion.posterior: closed form vs independent computations, shapes, dtypes, bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from simple_diffusion.forward import q_sample, q_step
from simple_diffusion.posterior import q_posterior_mean_variance
from simple_diffusion.schedules import NoiseSchedule


@pytest.fixture(scope="module")
def lin():
    return NoiseSchedule.from_name("linear", 1000)


@pytest.fixture(scope="module")
def cos():
    return NoiseSchedule.from_name("cosine", 1000)


def _reference(betas, t, x0, xt):
    "Eq. (eq-post-quadratic) in numpy from the betas alone: mean b/a, variance 1/a (code t >= 1)."
    b = betas.numpy()
    abar_prev = np.cumprod(1 - b)[t - 1]
    a = (1 - b[t]) / b[t] + 1 / (1 - abar_prev)
    return (math.sqrt(1 - b[t]) / b[t] * xt + math.sqrt(abar_prev) / (1 - abar_prev) * x0) / a, 1 / a


@pytest.mark.parametrize("shape", [(5, 2), (5, 3, 4, 4), (5,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(lin, shape, dtype):
    x0, xt = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    t = torch.tensor([0, 1, 2, 500, 999])
    mean, var, logvar = q_posterior_mean_variance(lin, x0, xt, t)
    assert mean.shape == shape and mean.dtype == dtype
    assert var.shape == logvar.shape == (5,) + (1,) * (len(shape) - 1)
    assert var.dtype == logvar.dtype == dtype


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic"])
def test_against_independent_numpy(name):
    s = NoiseSchedule.from_name(name, 1000)
    rng = np.random.default_rng(0)
    t = torch.tensor([1, 2, 10, 300, 998, 999])
    x0, xt = rng.uniform(-1, 1, (6, 3)), rng.normal(size=(6, 3))
    mean, var, logvar = q_posterior_mean_variance(s, torch.from_numpy(x0), torch.from_numpy(xt), t)
    for i, ti in enumerate(t.tolist()):
        m_ref, v_ref = _reference(s.betas, ti, x0[i], xt[i])
        np.testing.assert_allclose(mean[i].numpy(), m_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(var[i]), v_ref, rtol=1e-10)
        np.testing.assert_allclose(float(logvar[i]), math.log(v_ref), rtol=1e-10)


@pytest.mark.parametrize("t,x0,xt", [(1, 0.5, 0.52), (40, -0.7, 1.2), (700, 0.9, -0.3)])
def test_against_quadrature(lin, t, x0, xt):
    "Bayes' rule by scipy.integrate.quad: q(x_t | y) q(y | x_0), normalised; mean to 1e-7 s.d., variance to 1e-7 relative."
    beta, abar_prev = float(lin.betas[t]), float(lin.alphas_cumprod_prev[t])
    f = lambda y: stats.norm.pdf(xt, math.sqrt(1 - beta) * y, math.sqrt(beta)) * stats.norm.pdf(y, math.sqrt(abar_prev) * x0, math.sqrt(1 - abar_prev))
    # integrate over the span of both factors (the posterior lies between their peaks)
    m1, s1, m2, s2 = xt / math.sqrt(1 - beta), math.sqrt(beta / (1 - beta)), math.sqrt(abar_prev) * x0, math.sqrt(1 - abar_prev)
    lo, hi = min(m1 - 12 * s1, m2 - 12 * s2), max(m1 + 12 * s1, m2 + 12 * s2)
    pts = np.linspace(lo, hi, 50)
    kw = dict(points=pts, limit=500, epsabs=0, epsrel=1e-12)
    Z = integrate.quad(f, lo, hi, **kw)[0]
    m = integrate.quad(lambda y: y * f(y), lo, hi, **kw)[0] / Z
    v = integrate.quad(lambda y: (y - m) ** 2 * f(y), lo, hi, **kw)[0] / Z
    mean, var, _ = q_posterior_mean_variance(lin, torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t]))
    assert abs(m - float(mean)) < 1e-7 * math.sqrt(float(var))
    assert abs(v / float(var) - 1) < 1e-7


def test_regression_on_simulated_pairs(lin):
    "Slope, intercept and residual variance of x_{t-1} on x_t within 5 standard errors of c2, c1 x0, beta-tilde."
    N, t, x0v = 100_000, 20, -0.6
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((N, 1), x0v, dtype=torch.float64)
    xp = q_sample(lin, x0, torch.full((N,), t - 1), noise=torch.randn(N, 1, generator=gen, dtype=torch.float64))
    xt = q_step(lin, xp, torch.full((N,), t), noise=torch.randn(N, 1, generator=gen, dtype=torch.float64))
    fit = stats.linregress(xt[:, 0].numpy(), xp[:, 0].numpy())
    pv = float(lin.posterior_variance[t])
    rv = np.var(xp[:, 0].numpy() - fit.intercept - fit.slope * xt[:, 0].numpy(), ddof=2)
    assert abs(fit.slope - float(lin.posterior_mean_coef2[t])) < 5 * fit.stderr
    assert abs(fit.intercept - x0v * float(lin.posterior_mean_coef1[t])) < 5 * fit.intercept_stderr
    assert abs(rv - pv) < 5 * pv * math.sqrt(2 / N)


def test_published_values(lin):
    assert abs(float(lin.posterior_variance[487]) - 0.0097916) < 1e-6
    assert abs(float(lin.posterior_variance[1]) - 5.4532e-5) < 5e-10


def test_first_step(lin, cos):
    for s in (lin, cos):
        x0, xt = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        mean, var, logvar = q_posterior_mean_variance(s, x0, xt, torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)   # the state before x_1 is x_0 itself
        assert (var == 0).all()
        assert torch.isfinite(logvar).all()
        torch.testing.assert_close(logvar.flatten(), s.posterior_variance[1].log().expand(3), rtol=0, atol=0)


def test_float32_matches_float64(cos):
    x0, xt = torch.rand(6, 2, 3, 3, dtype=torch.float64) * 2 - 1, torch.randn(6, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    out64 = q_posterior_mean_variance(cos, x0, xt, t)
    out32 = q_posterior_mean_variance(cos, x0.float(), xt.float(), t)
    for a, b in zip(out32, out64):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_device(lin, device):
    s = lin.to(device)
    x = torch.randn(4, 1, 2, 2, device=device)
    mean, var, logvar = q_posterior_mean_variance(s, x, x, torch.tensor([0, 5, 50, 999], device=device))
    assert mean.device.type == var.device.type == logvar.device.type == device.type


@pytest.mark.parametrize("args,word", [
    (lambda x: (x, x[:, :1], torch.arange(4)), "xt"),
    (lambda x: (x, x.double(), torch.arange(4)), "xt"),
    (lambda x: (x.long(), x, torch.arange(4)), "x0"),
    (lambda x: ([0.0] * 4, x, torch.arange(4)), "x0"),
    (lambda x: (x, x, torch.tensor([0, 1, 2, 1000])), "[0, 999]"),
    (lambda x: (x, x, torch.tensor([-1, 1, 2, 3])), "[0, 999]"),
    (lambda x: (x, x, torch.arange(3)), "B=4"),
    (lambda x: (x, x, torch.zeros(4)), "integer"),
])
def test_bad_input(lin, args, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        q_posterior_mean_variance(lin, *args(torch.randn(4, 2, 3)))
