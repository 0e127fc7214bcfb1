"""Contracts of simple_diffusion.schedules: invariants, published values, precision, bad input."""
import math

import numpy as np
import pytest
import torch

from simple_diffusion.schedules import (SCHEDULES, NoiseSchedule, check_betas, get_beta_schedule,
                                        rescale_zero_terminal_snr)

KW = {"shifted_cosine": dict(image_size=32)}


def make(name, T, **kw):
    return NoiseSchedule.from_name(name, T, **{**KW.get(name, {}), **kw})


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [21, 50, 257, 1000, 4000])
def test_invariants(name, T):
    s = make(name, T)
    assert s.num_timesteps == T == len(s.betas)
    for k in NoiseSchedule.TABLES:
        v = getattr(s, k)
        assert v.dtype == torch.float64 and v.shape == (T,), k
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert (s.alphas_cumprod.diff() < 0).all() and s.alphas_cumprod[0] < 1
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    assert (s.posterior_variance <= s.betas).all() and s.posterior_variance[0] == 0
    # numerically independent recomputation of the core tables with numpy
    b = s.betas.numpy()
    abar = np.cumprod(1 - b)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), np.r_[1.0, abar[:-1]], rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy() ** 2, 1 - abar, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(s.snr.numpy(), abar / (1 - abar), rtol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_coefficients_are_consistent_with_the_forward_marginals(name):
    # E[x_{t-1}|x0] = coef1 x0 + coef2 E[x_t|x0]  and  Var(x_{t-1}|x0) = beta_tilde + coef2^2 Var(x_t|x0)
    s = make(name, 1000)
    a, ap = s.alphas_cumprod, s.alphas_cumprod_prev
    torch.testing.assert_close(s.posterior_mean_coef1 + s.posterior_mean_coef2 * a.sqrt(), ap.sqrt(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.posterior_variance + s.posterior_mean_coef2 ** 2 * (1 - a), 1 - ap, rtol=1e-9, atol=1e-12)


def test_published_end_values():
    # DDPM linear (1e-4 -> 0.02, T=1000) and Nichol & Dhariwal's cosine: documented alpha-bar_T
    assert make("linear", 1000).alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=2e-5)
    assert make("cosine", 1000).alphas_cumprod[-1].item() == pytest.approx(2.4288e-9, rel=2e-5)
    b = get_beta_schedule("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


def test_cosine_matches_closed_form_where_unclipped():
    T, s = 500, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    sched = make("cosine", T)
    clipped = sched.betas >= 0.999
    expect = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=torch.float64)
    ok = ~clipped & (torch.cumsum(clipped.long(), 0) == 0)
    torch.testing.assert_close(sched.alphas_cumprod[ok], expect[ok], rtol=1e-11, atol=0)


def test_linear_scaling_rule_and_small_T():
    assert get_beta_schedule("linear", 100).sum().item() == pytest.approx(get_beta_schedule("linear", 1000).sum().item())
    with pytest.raises(ValueError, match="beta_end"):
        get_beta_schedule("linear", 10)
    b = get_beta_schedule("linear", 10, beta_start=1e-3, beta_end=0.2)
    assert b[0].item() == pytest.approx(1e-3) and b[-1].item() == pytest.approx(0.2)


def test_shifted_cosine_is_a_constant_logsnr_offset():
    lo = make("shifted_cosine", 1000, image_size=64).log_snr
    hi = make("shifted_cosine", 1000, image_size=256).log_snr
    torch.testing.assert_close(hi - lo, torch.full_like(lo, 2 * math.log(64 / 256)), rtol=0, atol=1e-8)


def test_zero_terminal_snr():
    b = get_beta_schedule("cosine", 1000)
    z = rescale_zero_terminal_snr(b)
    s = NoiseSchedule(z)
    assert s.alphas_cumprod[-1] == 0 and z[-1] == 1
    assert s.alphas_cumprod[0].item() == pytest.approx(NoiseSchedule(b).alphas_cumprod[0].item(), rel=1e-12)
    assert (s.alphas_cumprod.diff() < 0).all()
    assert s.log_snr[-1] == -math.inf and torch.isfinite(s.log_snr[:-1]).all()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_gather_casts_at_use(dtype, rtol):
    s = make("cosine", 1000)
    t = torch.tensor([0, 1, 500, 998, 999])
    x = torch.zeros(5, 3, 4, 4, dtype=dtype)
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod"):
        v = s.gather(name, t, x)
        assert v.dtype == dtype and v.shape == (5, 1, 1, 1)
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.double().flatten(), getattr(s, name)[t], rtol=rtol, atol=0)


def test_float32_table_agrees_with_float64():
    for name in SCHEDULES:
        s = make(name, 1000)
        a32 = torch.cumprod(1 - s.betas.float(), 0).double()
        assert ((a32 - s.alphas_cumprod) / s.alphas_cumprod).abs().max() < 1e-4, name


def test_to_device(device):
    s = make("linear", 100).to(device)
    assert s.betas.device.type == device.type and s.betas.dtype == torch.float64
    x = torch.zeros(2, 1, 8, 8, device=device)
    v = s.gather("alphas_cumprod", torch.tensor([0, 99], device=device), x)
    assert v.device.type == device.type
    # a CPU schedule still serves data on any device
    v2 = make("linear", 100).gather("alphas_cumprod", torch.tensor([0, 99], device=device), x)
    torch.testing.assert_close(v, v2)


@pytest.mark.parametrize("call,word", [
    (lambda: get_beta_schedule("cosinus", 10), "'linear'"),
    (lambda: get_beta_schedule("cosine", 0), "num_timesteps"),
    (lambda: get_beta_schedule("cosine", -5), "num_timesteps"),
    (lambda: get_beta_schedule("cosine", 3.5), "num_timesteps"),
    (lambda: get_beta_schedule("cosine", 10, max_beta=1.5), "max_beta"),
    (lambda: get_beta_schedule("shifted_cosine", 10, image_size=0), "image_size"),
    (lambda: check_betas([0.1, 1.5]), "(0, 1)"),
    (lambda: check_betas([-0.1, 0.5]), "(0, 1)"),
    (lambda: check_betas([0.0]), "(0, 1)"),
    (lambda: check_betas([1.0, 0.5]), "(0, 1)"),
    (lambda: check_betas([[0.1, 0.2]]), "1-D"),
    (lambda: check_betas([]), "1-D"),
    (lambda: check_betas([0.1, float("inf")]), "finite"),
    (lambda: NoiseSchedule([0.1, float("nan")]), "finite"),
    (lambda: rescale_zero_terminal_snr([0.1]), "at least 2"),
])
def test_bad_input(call, word):
    with pytest.raises(ValueError) as e:
        call()
    assert word in str(e.value)


@pytest.mark.parametrize("t,word", [
    (torch.tensor([0, 100]), "[0, 99]"), (torch.tensor([-1, 0]), "[0, 99]"),
    (torch.tensor([0.0, 1.0]), "integer"), (torch.tensor([[0, 1]]), "shape"),
    (torch.tensor([0, 1, 2]), "B=2"), ([0, 1], "integer"), (torch.tensor([True, False]), "integer"),
])
def test_bad_timesteps(t, word):
    s = make("cosine", 100)
    with pytest.raises(ValueError) as e:
        s.gather("betas", t, torch.zeros(2, 3))
    assert word in str(e.value)
    with pytest.raises(ValueError, match="table"):
        s.gather("nope", torch.tensor([0, 1]), torch.zeros(2, 3))


def test_cosine_s_zero_still_allowed_closed_form():
    "Issue 17 checks s with check_number(s, 's', 0): s = 0 stays allowed, and β_1 = 1 - cos²(π/2T)/cos²(0) = sin²(π/(2T))."
    from simple_diffusion.schedules import cosine_betas
    for T in (4, 1000):
        assert abs(float(cosine_betas(T, s=0.0)[0]) - math.sin(math.pi / (2 * T)) ** 2) < 1e-15
    for bad in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ValueError, match="s must be a finite number"):
            cosine_betas(10, s=bad)
