"""Contracts of simple_diffusion.signals: the generated data, spectra, the 1-D denoiser, the library's
schedules, loss and samplers on [B, C, L] tensors, DiffWave's timestep alignment, inpainting, bad input."""
import math

import numpy as np
import pytest
import torch

from simple_diffusion.elbo import simple_loss
from simple_diffusion.forward import q_sample
from simple_diffusion.sampling import respace, sample
from simple_diffusion.schedules import NoiseSchedule, linear_betas
from simple_diffusion.signals import (SIGNAL_KINDS, SignalDenoiser, TimestepAligned, align_timesteps,
                                      dominant_frequency, inpaint_replacement, make_signals, psd_error_db,
                                      welch_psd)

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

DIFFWAVE = NoiseSchedule(linear_betas(50, 1e-4, 0.05))
FAST = NoiseSchedule(torch.tensor([1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5], dtype=torch.float64))


def test_make_signals_shapes_range_and_reproducibility():
    x, info = make_signals(60, 128, seed=3)
    assert x.shape == (60, 1, 128) and x.dtype == torch.float32
    assert len(info["kind"]) == 60 and info["freq"].shape == (60,)
    assert set(info["kind"]) <= set(SIGNAL_KINDS)
    assert bool(((info["freq"] >= 0.01) & (info["freq"] <= 0.1)).all())
    x2, _ = make_signals(60, 128, seed=3)
    assert torch.equal(x, x2)
    clean, _ = make_signals(60, 128, noise_std=0, seed=3)
    assert torch.allclose(clean.abs().amax(-1), torch.tensor(0.9), atol=1e-6)
    # the noise is white with the stated standard deviation: x - clean, 7680 draws, 5 standard errors
    resid = (x - clean).flatten()
    assert abs(float(resid.std()) / 0.02 - 1) < 5 / math.sqrt(2 * len(resid))


def test_make_signals_families():
    x, info = make_signals(40, 256, kinds=("damped",), noise_std=0, seed=0)
    assert set(info["kind"]) == {"damped"}
    # a damped oscillation's envelope decays: the first quarter holds more energy than the last
    e = x[:, 0].pow(2)
    assert bool((e[:, :64].sum(1) > e[:, -64:].sum(1)).all())
    f, frac = dominant_frequency(x)
    assert float((f - info["freq"]).abs().max()) <= 2 / 256


def test_welch_pure_tone_closed_form():
    L, A, f0, sigma = 256, 0.7, 32 / 256, 0.05
    g = torch.Generator().manual_seed(0)
    n = torch.arange(L, dtype=torch.float64)
    x = A * torch.cos(2 * math.pi * f0 * n) + sigma * torch.randn(300, L, generator=g, dtype=torch.float64)
    f, P = welch_psd(x)
    assert P.shape == (300, len(f)) and f[0] == 0 and abs(f[-1] - 0.5) < 1e-12
    power = P.sum(1).mean() * (f[1] - f[0])
    assert abs(power / (A**2 / 2 + sigma**2) - 1) < 0.01
    floor = P[:, (f > 0.25) & (f < 0.49)].mean()
    assert abs(floor / (2 * sigma**2) - 1) < 0.05
    fstar, frac = dominant_frequency(x)
    assert float((fstar - f0).abs().max()) < 1 / (8 * L) and float(frac.min()) > 0.9


def test_psd_error_zero_for_identical_and_positive_otherwise():
    x, _ = make_signals(50, 128, seed=0)
    assert psd_error_db(x, x) == 0.0
    assert psd_error_db(2 * x, x) == pytest.approx(20 * math.log10(2), rel=1e-9)   # power x4 = 6.02 dB


def test_denoiser_shapes_and_receptive_field():
    for layers, cycle, k in ((6, 4, 3), (5, 3, 5)):
        net = SignalDenoiser(channels=8, layers=layers, cycle=cycle, kernel_size=k).double()
        x = torch.randn(2, 1, 300, dtype=torch.float64, requires_grad=True)
        assert net(x, torch.tensor([0, 49])).shape == x.shape
        torch.nn.init.normal_(net.head[-1].weight)
        net(x, torch.tensor([3.5, 3.5]))[0, 0, 150].backward()
        nz = torch.nonzero(x.grad[0, 0]).flatten()
        assert int(nz.max() - nz.min() + 1) == net.receptive_field == 1 + (k - 1) * sum(net.dilations)
        assert x.grad[1].abs().max() == 0       # examples do not mix
    assert SignalDenoiser(in_channels=3)(torch.randn(2, 3, 40), torch.zeros(2)).shape == (2, 3, 40)


def test_library_paths_accept_signals():
    "The schedules, forward process, loss and samplers take [B, C, L] tensors unchanged."
    net = SignalDenoiser(channels=8, layers=3)
    x0, _ = make_signals(4, 64, seed=0)
    t = torch.tensor([0, 10, 30, 49])
    assert q_sample(DIFFWAVE, x0, t).shape == x0.shape
    loss = simple_loss(net, DIFFWAVE, x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and bool(torch.isfinite(loss).all())
    # the zero-initialised head predicts eps = 0: the loss is the mean of eps^2
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(simple_loss(net, DIFFWAVE, x0, t=t, noise=noise), noise.pow(2).mean((1, 2)))
    for sampler, steps in (("ddpm", None), ("ddim", 10), ("dpmpp2m", 6)):
        xs = sample(net, DIFFWAVE, (3, 1, 64), sampler, steps, generator=torch.Generator().manual_seed(0))
        assert xs.shape == (3, 1, 64) and bool(torch.isfinite(xs).all())


def test_align_timesteps():
    assert torch.allclose(align_timesteps(DIFFWAVE, DIFFWAVE), torch.arange(50, dtype=torch.float64))
    sp = respace(DIFFWAVE, 7)
    assert torch.allclose(align_timesteps(DIFFWAVE, sp), sp.timesteps.double(), atol=1e-9)
    ta = align_timesteps(DIFFWAVE, FAST)
    assert ta.shape == (6,) and ta[0] == 0 and bool((ta.diff() > 0).all()) and ta[-1] < 49
    # linear interpolation of √ᾱ at the aligned t gives back the fast schedule's √ᾱ
    a = DIFFWAVE.sqrt_alphas_cumprod
    i = ta.floor().long().clamp(max=48)
    interp = a[i] + (ta - i) * (a[i + 1] - a[i])
    assert torch.allclose(interp, FAST.sqrt_alphas_cumprod, atol=1e-12)
    wrapped = TimestepAligned(SignalDenoiser(channels=4, layers=2), DIFFWAVE, FAST)
    assert sample(wrapped, FAST, (2, 1, 32), generator=torch.Generator().manual_seed(0)).shape == (2, 1, 32)


def test_inpaint_keeps_known_part_and_fills_with_an_exact_model():
    "With the exact denoiser of a point mass (x0 known), replacement must reproduce x0 in the gap."
    x0, _ = make_signals(3, 64, seed=0)
    sch = DIFFWAVE

    def exact(xt, t):   # ε = (x_t - √ᾱ x0) / √(1-ᾱ): the denoiser of the single signal x0
        return (xt - sch.gather("sqrt_alphas_cumprod", t, xt) * x0) / sch.gather("sqrt_one_minus_alphas_cumprod", t, xt)
    mask = torch.ones(1, 1, 64)
    mask[..., 20:40] = 0
    known = x0 * mask + 5.0 * (1 - mask)          # garbage where the mask is 0
    out = inpaint_replacement(exact, sch, known, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., mask[0, 0] == 1], x0[..., mask[0, 0] == 1])
    assert torch.allclose(out, x0, atol=1e-4)


def test_bad_inputs_name_the_argument():
    x, _ = make_signals(4, 32)
    net = SignalDenoiser(channels=4, layers=2)
    cases = [(lambda: make_signals(0), "n"), (lambda: make_signals(3, 8), "length"),
             (lambda: make_signals(3, kinds=("square",)), "kinds"), (lambda: make_signals(3, kinds=()), "kinds"),
             (lambda: make_signals(3, noise_std=-0.1), "noise_std"), (lambda: make_signals(3, seed=-1), "seed"),
             (lambda: welch_psd([1, 2, 3]), "x"), (lambda: welch_psd(x, nperseg=64), "nperseg"),
             (lambda: psd_error_db(x, x[..., :16]), "length"), (lambda: psd_error_db(x, "ref"), "ref"),
             (lambda: dominant_frequency(x, oversample=0), "oversample"),
             (lambda: SignalDenoiser(channels=0), "channels"), (lambda: SignalDenoiser(layers=0), "layers"),
             (lambda: SignalDenoiser(kernel_size=2), "kernel_size"), (lambda: SignalDenoiser(cycle=0), "cycle"),
             (lambda: net(x[:, 0], torch.zeros(4)), "x"), (lambda: net(x, torch.zeros(3)), "t"),
             (lambda: align_timesteps(DIFFWAVE, [0.1]), "fast"), (lambda: align_timesteps(FAST, DIFFWAVE), "fast"),
             (lambda: inpaint_replacement(net, "s", x, torch.ones(1, 1, 32)), "schedule"),
             (lambda: inpaint_replacement(net, DIFFWAVE, x, torch.ones(1, 1, 5)), "mask"),
             (lambda: inpaint_replacement(net, DIFFWAVE, x, torch.full((1, 1, 32), 0.5)), "mask"),
             (lambda: inpaint_replacement(net, DIFFWAVE, x.long(), torch.ones(1, 1, 32)), "x_known")]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            fn()
