"""Contracts of simple_diffusion.forward: statistics, the chain vs the shortcut, devices, bad input."""
import math

import pytest
import torch
from scipy import stats

from simple_diffusion.forward import q_mean_variance, q_sample, q_step
from simple_diffusion.schedules import NoiseSchedule


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_name("linear", 1000)


@pytest.mark.parametrize("shape", [(20_000, 2), (5_000, 1, 4, 4)])
@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_moments(sched, shape, t):
    gen = torch.Generator().manual_seed(t)
    x0 = torch.rand(shape[1:], generator=gen, dtype=torch.float64) * 2 - 1
    xb = x0.expand(shape).contiguous()
    torch.manual_seed(t)
    xt = q_sample(sched, xb, torch.full((shape[0],), t))
    abar = sched.alphas_cumprod[t].item()
    n = shape[0]
    # per-coordinate mean within 5 standard errors; pooled variance within 5 s.e. (sigma^2 sqrt(2/n))
    z = (xt.mean(0) - math.sqrt(abar) * x0).abs() / math.sqrt((1 - abar) / n)
    assert z.max() < 5
    var = ((xt - math.sqrt(abar) * x0) ** 2).mean().item()
    assert abs(var - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / xt.numel())


def test_chain_matches_shortcut_in_distribution(sched):
    torch.manual_seed(0)
    N, t = 3000, 300
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64).expand(N, 6).contiguous()
    x = x0
    for s in range(t + 1):
        x = q_step(sched, x, torch.full((N,), s))
    y = q_sample(sched, x0, torch.full((N,), t))
    assert stats.ks_2samp(x.sum(1).numpy(), y.sum(1).numpy()).pvalue > 1e-3
    # and the chain's pixel means against the closed form
    abar = sched.alphas_cumprod[t].item()
    z = (x.mean(0) - math.sqrt(abar) * x0[0]).abs() / math.sqrt((1 - abar) / N)
    assert z.max() < 5


def test_given_noise_is_used_exactly(sched):
    x0 = torch.randn(4, 3, dtype=torch.float64)
    e = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 999])
    a = sched.alphas_cumprod[t][:, None]
    torch.testing.assert_close(q_sample(sched, x0, t, noise=e), a.sqrt() * x0 + (1 - a).sqrt() * e)
    b = sched.betas[t][:, None]
    torch.testing.assert_close(q_step(sched, x0, t, noise=e), (1 - b).sqrt() * x0 + b.sqrt() * e)
    mean, var, logvar = q_mean_variance(sched, x0, t)
    torch.testing.assert_close(mean, a.sqrt() * x0)
    torch.testing.assert_close(var, 1 - a)
    torch.testing.assert_close(logvar, (1 - a).log())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_follow_data(sched, dtype, device):
    x0 = torch.zeros(3, 1, 8, 8, dtype=dtype, device=device)
    t = torch.tensor([0, 5, 999], device=device)
    for out in (q_sample(sched, x0, t), q_step(sched, x0, t), *q_mean_variance(sched, x0, t)):
        assert out.dtype == dtype and out.device.type == device.type


def test_float32_matches_float64(sched):
    x0 = torch.rand(8, 1, 8, 8, dtype=torch.float64) * 2 - 1
    e = torch.randn_like(x0)
    t = torch.randint(0, 1000, (8,))
    a = q_sample(sched, x0, t, noise=e)
    b = q_sample(sched, x0.float(), t, noise=e.float())
    torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,word", [
    (lambda s: q_sample(s, torch.zeros(2, 3), torch.tensor([0, 1000])), "[0, 999]"),
    (lambda s: q_sample(s, torch.zeros(2, 3), torch.tensor([-1, 0])), "[0, 999]"),
    (lambda s: q_sample(s, torch.zeros(2, 3), torch.tensor([0, 1, 2])), "B=2"),
    (lambda s: q_sample(s, torch.zeros(2, 3), torch.tensor([[0, 1]])), "shape"),
    (lambda s: q_sample(s, torch.zeros(2, 3), torch.tensor([0.5, 1.0])), "integer"),
    (lambda s: q_sample(s, torch.zeros(2, 3), torch.tensor([0, 1]), noise=torch.zeros(2, 4)), "noise"),
    (lambda s: q_sample(s, torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1])), "x0"),
    (lambda s: q_step(s, torch.zeros(2, 3), torch.tensor([0, 1]), noise=torch.zeros(3, 3)), "noise"),
    (lambda s: q_step(s, "x", torch.tensor([0, 1])), "x_prev"),
    (lambda s: q_mean_variance(s, torch.zeros(2, 3), torch.tensor([0, 5000])), "[0, 999]"),
])
def test_bad_input(sched, call, word):
    with pytest.raises(ValueError) as e:
        call(sched)
    assert word in str(e.value)
