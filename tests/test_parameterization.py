"""Contracts of simple_diffusion.parameterization: conversions, round trips, p_mean_variance, bad input."""
import math

import numpy as np
import pytest
import torch

from simple_diffusion.forward import q_sample
from simple_diffusion.parameterization import (PREDICTIONS, VARIANCES, PMeanVar, eps_from_v, eps_from_x0, p_mean_variance,
                                               v_from_x0_eps, x0_eps_from_output, x0_from_eps, x0_from_v)
from simple_diffusion.posterior import q_posterior_mean_variance
from simple_diffusion.schedules import NoiseSchedule

T_STEPS = torch.tensor([0, 1, 2, 10, 250, 500, 900, 997, 998, 999])


@pytest.fixture(scope="module", params=["linear", "cosine"])
def sched(request):
    return NoiseSchedule.from_name(request.param, 1000)


def _data(n=len(T_STEPS), shape=(2, 4, 4), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return x0.to(dtype), eps.to(dtype)


def _kappa(s, t, ndim):
    "Condition number of the x0 <-> eps conversions, 1 / min(sqrt(abar), sqrt(1 - abar)), shaped [B, 1, ...]."
    k = 1 / torch.minimum(s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod)[T_STEPS if t is None else t]
    return k.reshape(-1, *([1] * (ndim - 1)))


def test_constants():
    assert PREDICTIONS == ("eps", "x0", "v")
    assert VARIANCES == ("fixed_small", "fixed_large", "learned_range")
    assert PMeanVar._fields == ("mean", "variance", "log_variance", "pred_x0")


def test_conversions_against_numpy(sched):
    "Each conversion against the formula evaluated in numpy from the betas (cumprod, not the schedule's tables)."
    x0, eps = _data()
    abar = np.cumprod(1 - sched.betas.numpy())[T_STEPS.numpy()].reshape(-1, 1, 1, 1)
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    x0n, epsn = x0.numpy(), eps.numpy()
    xtn = a * x0n + s * epsn
    vn = a * epsn - s * x0n
    xt, t = torch.from_numpy(xtn), T_STEPS
    np.testing.assert_allclose(v_from_x0_eps(sched, x0, t, eps).numpy(), vn, rtol=0, atol=1e-12)
    np.testing.assert_allclose(x0_from_eps(sched, xt, t, eps).numpy(), (xtn - s * epsn) / a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(eps_from_x0(sched, xt, t, x0).numpy(), (xtn - a * x0n) / s, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(x0_from_v(sched, xt, t, torch.from_numpy(vn)).numpy(), a * xtn - s * vn, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eps_from_v(sched, xt, t, torch.from_numpy(vn)).numpy(), s * xtn + a * vn, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_round_trips(sched, dtype, tol):
    "eps <-> x0 <-> v round trips; tolerance tol * kappa for the eps/x0 legs (they divide by sqrt(abar) or sqrt(1-abar))."
    x0, eps = _data(dtype=dtype)
    t = T_STEPS
    xt = q_sample(sched, x0, t, noise=eps)
    v = v_from_x0_eps(sched, x0, t, eps)
    k = _kappa(sched, None, x0.ndim).to(dtype)
    assert ((x0_from_eps(sched, xt, t, eps_from_x0(sched, xt, t, x0)) - x0).abs() / k).max() < tol
    assert ((eps_from_x0(sched, xt, t, x0_from_eps(sched, xt, t, eps)) - eps).abs() / k).max() < tol
    assert (x0_from_v(sched, xt, t, v) - x0).abs().max() < tol
    assert (eps_from_v(sched, xt, t, v) - eps).abs().max() < tol
    assert (v_from_x0_eps(sched, x0_from_v(sched, xt, t, v), t, eps_from_v(sched, xt, t, v)) - v).abs().max() < tol
    # (x0, eps) -> (xt, v) is a rotation: norms are preserved
    torch.testing.assert_close(xt ** 2 + v ** 2, x0 ** 2 + eps ** 2, rtol=10 * tol, atol=10 * tol)


def test_float32_matches_float64(sched):
    x0, eps = _data()
    t = T_STEPS
    xt, v = q_sample(sched, x0, t, noise=eps), v_from_x0_eps(sched, x0, t, eps)
    k = _kappa(sched, None, x0.ndim)
    for f, a, b, scale in [(x0_from_eps, xt, eps, k), (eps_from_x0, xt, x0, k), (x0_from_v, xt, v, 1), (eps_from_v, xt, v, 1),
                           (v_from_x0_eps, x0, eps, 1)]:
        d = (f(sched, a.float(), t, b.float()).double() - f(sched, a, t, b)).abs() / scale
        assert d.max() < 1e-5, f.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3,), (2, 4, 4)])
def test_conversion_shapes_dtypes(sched, dtype, shape):
    x0, eps = _data(shape=shape, dtype=dtype)
    for f in (x0_from_eps, eps_from_x0, x0_from_v, eps_from_v, v_from_x0_eps):
        out = f(sched, x0, T_STEPS, eps)
        assert out.shape == x0.shape and out.dtype == dtype, f.__name__
    for pred in PREDICTIONS:
        a, b = x0_eps_from_output(sched, x0, T_STEPS, eps, pred)
        assert a.shape == b.shape == x0.shape and a.dtype == b.dtype == dtype


def _oracle(x0, eps, s, prediction, extra=None):
    def model(xt, t, **kw):
        target = {"eps": eps, "x0": x0, "v": v_from_x0_eps(s, x0, t, eps)}[prediction]
        return target if extra is None else torch.cat([target, extra.expand_as(target)], 1)
    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_perfect_model_gives_posterior(sched, prediction):
    x0, eps = _data()
    t = T_STEPS
    xt = q_sample(sched, x0, t, noise=eps)
    pm, pv, plv = q_posterior_mean_variance(sched, x0, xt, t)
    out = p_mean_variance(_oracle(x0, eps, sched, prediction), sched, xt, t, prediction=prediction)
    assert isinstance(out, PMeanVar)
    assert (out.mean - pm).abs().max() < 1e-12
    assert ((out.pred_x0 - x0).abs() / _kappa(sched, None, x0.ndim)).max() < 1e-12
    assert torch.equal(out.variance, pv.expand_as(xt)) and torch.equal(out.log_variance, plv.expand_as(xt))
    pred_x0, pred_eps = x0_eps_from_output(sched, xt, t, _oracle(x0, eps, sched, prediction)(xt, t), prediction)
    assert ((pred_eps - eps).abs() / _kappa(sched, None, x0.ndim)).max() < 1e-12


def test_variance_choices(sched):
    x0, eps = _data()
    t = T_STEPS
    xt = q_sample(sched, x0, t, noise=eps)
    one = torch.tensor(1.0, dtype=torch.float64)
    small = p_mean_variance(_oracle(x0, eps, sched, "eps"), sched, xt, t, variance="fixed_small")
    large = p_mean_variance(_oracle(x0, eps, sched, "eps"), sched, xt, t, variance="fixed_large")
    lo = p_mean_variance(_oracle(x0, eps, sched, "eps", -one), sched, xt, t, variance="learned_range")
    hi = p_mean_variance(_oracle(x0, eps, sched, "eps", one), sched, xt, t, variance="learned_range")
    mid = p_mean_variance(_oracle(x0, eps, sched, "eps", 0 * one), sched, xt, t, variance="learned_range")
    b, pv = sched.betas[t].reshape(-1, 1, 1, 1), sched.posterior_variance[t].reshape(-1, 1, 1, 1)
    # fixed_large: (beta-tilde_2, beta_2, ..., beta_T)
    want_large = torch.where(t.reshape(-1, 1, 1, 1) == 0, sched.posterior_variance[1], b).expand_as(xt)
    torch.testing.assert_close(large.variance, want_large, rtol=1e-14, atol=0)
    torch.testing.assert_close(large.log_variance, want_large.log(), rtol=1e-14, atol=0)
    torch.testing.assert_close(small.variance, pv.expand_as(xt), rtol=0, atol=0)
    # learned_range at nu = -1, +1, 0: log beta-tilde (clipped), log beta, and their geometric mean
    torch.testing.assert_close(lo.log_variance, small.log_variance, rtol=1e-14, atol=0)
    torch.testing.assert_close(hi.log_variance, b.log().expand_as(xt), rtol=1e-14, atol=0)
    torch.testing.assert_close(hi.log_variance[1:], large.log_variance[1:], rtol=1e-14, atol=0)
    torch.testing.assert_close(mid.variance, (b * sched.posterior_log_variance_clipped[t].exp().reshape(-1, 1, 1, 1)).sqrt().expand_as(xt), rtol=1e-12, atol=0)
    torch.testing.assert_close(mid.variance, mid.log_variance.exp(), rtol=0, atol=0)
    for o in (small, large, lo, hi):
        torch.testing.assert_close(o.mean, small.mean, rtol=0, atol=0)   # the variance choice does not touch the mean


def test_learned_range_per_element():
    s = NoiseSchedule.from_name("linear", 100)
    nu = torch.linspace(-1, 1, 8).reshape(1, 2, 2, 2).expand(3, -1, -1, -1)
    model = lambda x, t: torch.cat([torch.zeros_like(x), nu], 1)
    out = p_mean_variance(model, s, torch.zeros(3, 2, 2, 2), torch.tensor([0, 50, 99]), variance="learned_range")
    assert out.variance.shape == (3, 2, 2, 2)
    frac = (nu + 1) / 2
    t = torch.tensor([0, 50, 99])
    want = frac * s.betas.log()[t].reshape(-1, 1, 1, 1) + (1 - frac) * s.posterior_log_variance_clipped[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.log_variance, want.float())


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("shape", [(4, 2), (4, 3, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_p_mean_variance_shapes(prediction, variance, shape, dtype):
    s = NoiseSchedule.from_name("cosine", 1000)
    xt = torch.randn(shape, dtype=dtype)
    factor = 2 if variance == "learned_range" else 1
    model = lambda x, t: torch.randn(x.shape[0], factor * x.shape[1], *x.shape[2:], dtype=x.dtype)
    out = p_mean_variance(model, s, xt, torch.tensor([0, 1, 500, 999]), prediction=prediction, variance=variance)
    for f in out:
        assert f.shape == xt.shape and f.dtype == dtype
        assert torch.isfinite(f).all()


def test_clip_denoised():
    s = NoiseSchedule.from_name("cosine", 1000)
    gen = torch.Generator().manual_seed(0)
    xt = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([800, 900, 950, 999])
    raw = torch.randn(xt.shape, generator=gen, dtype=torch.float64)
    x0, eps = x0_eps_from_output(s, xt, t, raw, "eps")
    assert x0.abs().max() > 1                               # unclipped x0 from an eps guess leaves [-1, 1] here
    x0c, epsc = x0_eps_from_output(s, xt, t, raw, "eps", clip_denoised=True)
    torch.testing.assert_close(x0c, x0.clamp(-1, 1))
    torch.testing.assert_close(x0_from_eps(s, xt, t, epsc), x0c, rtol=0, atol=1e-9)   # eps recomputed from the clipped x0
    out = p_mean_variance(lambda x, t: raw, s, xt, t, clip_denoised=True)
    torch.testing.assert_close(out.pred_x0, x0c)
    torch.testing.assert_close(out.mean, q_posterior_mean_variance(s, x0c, xt, t)[0])


def test_model_kwargs_and_dtype_cast():
    s = NoiseSchedule.from_name("linear", 1000)
    seen = {}
    def model(x, t, y=None):
        seen["y"], seen["t"] = y, t
        return torch.zeros(x.shape, dtype=torch.float32)        # a float32 model fed float64 data
    xt = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([3, 7])
    out = p_mean_variance(model, s, xt, torch.tensor([4, 5]), model_kwargs={"y": y})
    assert seen["y"] is y and seen["t"].tolist() == [4, 5]
    assert out.mean.dtype == torch.float64


def test_device(device):
    s = NoiseSchedule.from_name("cosine", 1000).to(device)
    xt = torch.randn(4, 2, 3, 3, device=device)
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], device=x.device)
    out = p_mean_variance(model, s, xt, torch.tensor([0, 1, 500, 999], device=device), prediction="v", variance="learned_range")
    assert all(f.device.type == device.type for f in out)


def _never_called(x, t, **kw):
    raise AssertionError("the model must not be called with invalid arguments")


@pytest.mark.parametrize("kwargs,word", [
    (dict(prediction="score"), "prediction"),
    (dict(prediction="epsilon"), r"\('eps', 'x0', 'v'\)"),
    (dict(variance="learned"), "variance"),
    (dict(variance="fixed"), r"\('fixed_small', 'fixed_large', 'learned_range'\)"),
    (dict(model_kwargs=[1, 2]), "model_kwargs"),
])
def test_bad_names_rejected_before_model_call(kwargs, word):
    s = NoiseSchedule.from_name("linear", 1000)
    with pytest.raises(ValueError, match=word):
        p_mean_variance(_never_called, s, torch.randn(4, 3, 2, 2), torch.arange(4), **kwargs)


@pytest.mark.parametrize("t", [torch.tensor([0, 1, 2, 1000]), torch.tensor([-1, 0, 1, 2]), torch.arange(3), torch.zeros(4)])
def test_bad_t_rejected_before_model_call(t):
    s = NoiseSchedule.from_name("linear", 1000)
    with pytest.raises(ValueError, match="t must"):
        p_mean_variance(_never_called, s, torch.randn(4, 3, 2, 2), t)


@pytest.mark.parametrize("variance,out_shape,x_shape", [
    ("fixed_small", (4, 6, 2, 2), (4, 3, 2, 2)),       # 2C channels without learned_range
    ("learned_range", (4, 3, 2, 2), (4, 3, 2, 2)),     # C channels with learned_range
    ("fixed_large", (4, 3, 2), (4, 3, 2, 2)),          # wrong rank
    ("learned_range", (4, 3), (4, 2)),                 # toy data [B, D] needs 2D outputs
])
def test_output_shape_checked(variance, out_shape, x_shape):
    s = NoiseSchedule.from_name("linear", 1000)
    with pytest.raises(ValueError, match="model output"):
        p_mean_variance(lambda x, t: torch.zeros(out_shape), s, torch.zeros(x_shape), torch.arange(4), variance=variance)


def test_learned_range_on_toy_data():
    s = NoiseSchedule.from_name("linear", 1000)
    out = p_mean_variance(lambda x, t: torch.zeros(4, 4), s, torch.zeros(4, 2), torch.arange(4), variance="learned_range")
    assert all(f.shape == (4, 2) for f in out)


def test_model_output_must_be_a_tensor_and_learned_needs_channels():
    s = NoiseSchedule.from_name("linear", 1000)
    with pytest.raises(ValueError, match="model output"):
        p_mean_variance(lambda x, t: x.tolist(), s, torch.zeros(4, 2), torch.arange(4))
    with pytest.raises(ValueError, match="channel"):
        p_mean_variance(lambda x, t: x, s, torch.zeros(4), torch.arange(4), variance="learned_range")


@pytest.mark.parametrize("f,args,word", [
    (x0_from_eps, lambda x: (x, x[:, :1]), "eps"),
    (eps_from_x0, lambda x: (x, x.double()), "x0"),
    (x0_from_v, lambda x: (x, x[:2]), "v"),
    (eps_from_v, lambda x: (x.long(), x), "xt"),
    (v_from_x0_eps, lambda x: (x, x.reshape(4, -1)), "eps"),
])
def test_conversion_bad_input(f, args, word):
    s = NoiseSchedule.from_name("linear", 1000)
    a, b = args(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=word):
        f(s, a, torch.arange(4), b)
    with pytest.raises(ValueError, match="t must"):
        f(s, torch.randn(4, 3), torch.tensor([0, 1, 2, 1000]), torch.randn(4, 3))


def test_x0_eps_from_output_bad_input():
    s = NoiseSchedule.from_name("linear", 1000)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="prediction"):
        x0_eps_from_output(s, x, torch.arange(4), x, "velocity")
    with pytest.raises(ValueError, match="output"):
        x0_eps_from_output(s, x, torch.arange(4), x[:, :2], "eps")
