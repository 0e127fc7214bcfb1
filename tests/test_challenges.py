"""Contracts of simple_diffusion.challenges: the mode-coverage evaluator on constructed cases, the GAN and
distillation code paths, FLOP counts against closed forms, power-law fits, and every bad-input path."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from simple_diffusion.challenges import (GAN, activation_bytes, compare_coverage, distill_round, fit_power_law,
                                         flops_per_call, gan_losses, gaussian_ball_mass, grid25, mlp, mode_coverage,
                                         progressive_distillation, ring8, standardise, summarise, train_ddpm,
                                         train_gan, train_images_per_s)
from simple_diffusion.data import GaussianMixture
from simple_diffusion.nets import MLPDenoiser, make_unet
from simple_diffusion.sampling import SpacedSchedule, ddim_step, sample, space_timesteps
from simple_diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

N = 2500
P3 = 1 - math.exp(-4.5)
gen = lambda k: torch.Generator().manual_seed(k)


def binomial_ok(share, p, n=N, z=5):
    "share within z binomial standard errors of p."
    return abs(share - p) < z * math.sqrt(p * (1 - p) / n)


def test_ball_mass_is_the_chi2_cdf():
    for r in (0.5, 1, 2, 3):
        assert math.isclose(gaussian_ball_mass(r), scipy.stats.chi2(2).cdf(r * r), rel_tol=1e-12)
    assert gaussian_ball_mass(0) == 0


def test_protocol_mixtures():
    g = grid25()
    assert g.means.shape == (25, 2) and set(g.means.flatten().tolist()) == {-4, -2, 0, 2, 4}
    assert torch.all(g.stds == 0.05)
    r = ring8()
    ang = torch.atan2(r.means[:, 1], r.means[:, 0])
    assert len(torch.unique(ang.round(decimals=6))) == 8
    assert torch.allclose(r.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert torch.all(r.stds == 0.02)


@pytest.mark.parametrize("mix", [grid25(), ring8()], ids=["grid", "ring"])
def test_exact_draws_capture_every_mode(mix):
    r = mode_coverage(mix.sample(N, gen(0))[0], mix)
    assert r["modes"] == len(mix.weights) and binomial_ok(r["high_quality"], P3)
    assert sum(r["counts"]) == round(r["high_quality"] * N)
    assert 0 <= r["kl"] < 0.05          # a multinomial histogram of ~2,470 draws is close to uniform


def test_one_mode_sampler():
    mix = grid25()
    x = mix.means[7] + 0.05 * torch.randn(N, 2, generator=gen(1), dtype=torch.float64)
    r = mode_coverage(x, mix)
    assert r["modes"] == 1 and math.isclose(r["kl"], math.log(25), rel_tol=1e-12)
    assert r["counts"][7] == round(r["high_quality"] * N) and binomial_ok(r["high_quality"], P3)


def test_all_noise():
    mix = grid25()
    x = 12 * torch.rand(N, 2, generator=gen(2), dtype=torch.float64) - 6
    a = 25 * math.pi * 0.15**2 / 144        # the 25 disjoint 3σ disks inside the square
    r = mode_coverage(x, mix)
    assert binomial_ok(r["high_quality"], a)
    q = 1 - (1 - a / 25) ** N
    assert abs(r["modes"] - 25 * q) < 4 * math.sqrt(25 * q * (1 - q))
    far = torch.full((10, 2), 100.0)
    rf = mode_coverage(far, mix)
    assert rf["modes"] == 0 and rf["high_quality"] == 0 and math.isnan(rf["kl"])


def test_off_by_one_ring():
    a = torch.linspace(0, 2 * math.pi, 8, dtype=torch.float64)      # repeats the angle 0
    off = GaussianMixture(2 * torch.stack([a.cos(), a.sin()], 1), torch.full((8,), 0.02))
    r = mode_coverage(off.sample(N, gen(3))[0], ring8())
    assert r["modes"] == 1 and binomial_ok(r["high_quality"], P3 * 2 / 8)


def test_evaluator_bad_input():
    mix = grid25()
    with pytest.raises(ValueError, match="samples"): mode_coverage(torch.zeros(5, 3), mix)
    with pytest.raises(ValueError, match="samples"): mode_coverage(torch.zeros(5), mix)
    with pytest.raises(ValueError, match="samples"): mode_coverage(torch.full((5, 2), math.nan), mix)
    with pytest.raises(ValueError, match="samples"): mode_coverage([[0.0, 0.0]], mix)
    with pytest.raises(ValueError, match="mixture"): mode_coverage(torch.zeros(5, 2), mix.means)
    with pytest.raises(ValueError, match="n_sigma"): mode_coverage(torch.zeros(5, 2), mix, n_sigma=0)
    aniso = GaussianMixture(torch.zeros(1, 2), torch.tensor([[0.1, 0.2]]))
    with pytest.raises(ValueError, match="mixture"): mode_coverage(torch.zeros(5, 2), aniso)
    with pytest.raises(ValueError, match="std"): grid25(std=0)
    with pytest.raises(ValueError, match="radius"): ring8(radius=-1)
    with pytest.raises(ValueError, match="n_sigma"): gaussian_ball_mass(-1)


def test_gan_shapes_and_losses():
    gan = GAN(dim=2, latent_dim=3, hidden=8, depth=1, pack=4)
    assert gan.sample(8, gen(0)).shape == (8, 2) and gan.critic(torch.zeros(8, 2)).shape == (2,)
    torch.nn.init.zeros_(gan.D[-1].weight)
    torch.nn.init.zeros_(gan.D[-1].bias)
    d, g = gan_losses(gan, torch.randn(8, 2), gan.sample(8))
    assert math.isclose(d.item(), 2 * math.log(2), rel_tol=1e-6) and math.isclose(g.item(), math.log(2), rel_tol=1e-6)
    assert len(mlp(2, 1, 8, 2)) == 2 * 3 + 1


def test_train_gan_runs_and_learns_a_shift():
    "A few hundred steps on one tight cluster move the generator towards it (a seeded, generous check)."
    x = torch.randn(512, 2, generator=gen(0)) * 0.1 + torch.tensor([2.0, -1.0])
    gan = train_gan(x, steps=300, batch_size=64, hidden=32, depth=1, lr=1e-3, seed=0)
    with torch.no_grad(): y = gan.sample(1000, gen(1))
    assert not gan.training and (y.mean(0) - torch.tensor([2.0, -1.0])).norm() < 0.5
    packed = train_gan(x, steps=3, batch_size=8, hidden=8, depth=1, pack=4)
    assert packed.pack == 4 and packed.sample(5).shape == (5, 2)


def test_gan_bad_input():
    x = torch.randn(16, 2)
    with pytest.raises(ValueError, match="steps"): train_gan(x, steps=-1)
    with pytest.raises(ValueError, match="batch_size"): train_gan(x, batch_size=0)
    with pytest.raises(ValueError, match="lr"): train_gan(x, lr=0)
    with pytest.raises(ValueError, match="x"): train_gan(torch.zeros(16))
    with pytest.raises(ValueError, match="pack"): GAN(pack=0)
    with pytest.raises(ValueError, match="depth"): mlp(2, 2, 8, -1)


def test_train_ddpm_and_compare_coverage_run():
    net, sched = train_ddpm(torch.randn(64, 2), steps=3, batch_size=8, hidden=8, depth=1)
    assert isinstance(net, MLPDenoiser) and net(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)).shape == (4, 2)
    assert sched.num_timesteps == 1000
    rows = compare_coverage(grid25(), (0,), steps=2, batch_size=8, hidden=8, depth=1, samplers=(("ddim", 3),),
                            n_train=100, n_samples=50, keep_samples=True)
    assert [r["method"] for r in rows] == ["DDPM, ddim 3 steps", "GAN", "PacGAN4"]
    assert all(r["samples"].shape == (50, 2) and 0 <= r["modes"] <= 25 for r in rows)
    s = summarise(rows + [dict(rows[1], modes=rows[1]["modes"] + 2)])
    assert s["GAN"]["modes"][2] == 2 and math.isclose(s["GAN"]["modes"][1], 1.0)   # s.e. of {m, m+2} is 1


def test_standardise():
    x = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64)
    z, mean, scale = standardise(x)
    assert torch.allclose(z.double() * scale + mean, x, atol=1e-6)
    assert torch.allclose(mean, x.mean(0)) and math.isclose(float(scale), float(x.flatten().std()))


def test_distillation_target_is_exact():
    "One DDIM step with the distillation target lands where two teacher steps land (Eq. eq-challenges-pd)."
    sched = NoiseSchedule.from_name("cosine", 1000)
    ab = sched.alphas_cumprod
    z = torch.randn(6, 2, generator=gen(4), dtype=torch.float64)
    e1, e2 = torch.randn(2, 6, 2, generator=gen(5), dtype=torch.float64)
    t, t1, t2 = 900, 600, 200
    x0a = (z - (1 - ab[t]).sqrt() * e1) / ab[t].sqrt()
    z1 = ddim_step(z, x0a, e1, float(ab[t]), float(ab[t1]))
    x0b = (z1 - (1 - ab[t1]).sqrt() * e2) / ab[t1].sqrt()
    z2 = ddim_step(z1, x0b, e2, float(ab[t1]), float(ab[t2]))
    r = math.sqrt((1 - ab[t2]) / (1 - ab[t]))
    x_tgt = (z2 - r * z) / (ab[t2].sqrt() - r * ab[t].sqrt())
    eps_tgt = (z - ab[t].sqrt() * x_tgt) / (1 - ab[t]).sqrt()
    assert torch.allclose(ddim_step(z, x_tgt, eps_tgt, float(ab[t]), float(ab[t2])), z2, atol=1e-10)


def test_distillation_runs_on_nested_grids():
    sched = NoiseSchedule.from_name("cosine", 1000)
    x = torch.randn(128, 2, generator=gen(6))
    net = MLPDenoiser(2, hidden=16, depth=1)
    out = progressive_distillation(net, sched, x, 8, 2, iters=3, batch_size=16)
    assert sorted(out) == [2, 4]
    g8 = space_timesteps(1000, 8, "leading")
    assert out[4][1].tolist() == g8[1::2].tolist() and out[2][1].tolist() == g8[1::2][1::2].tolist()
    stu = out[2][0]
    assert not stu.training and all(not p.requires_grad for p in stu.parameters())
    y = sample(stu, SpacedSchedule(sched, out[2][1]), (10, 2), "ddim", generator=gen(7))
    assert y.shape == (10, 2) and torch.isfinite(y).all()
    unet = make_unet("digits", base_channels=8)
    s1 = distill_round(unet, sched, torch.rand(16, 1, 8, 8) * 2 - 1, space_timesteps(1000, 4), iters=1, batch_size=4)
    assert s1 is not unet and s1(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 1, 8, 8)


def test_distillation_bad_input():
    sched = NoiseSchedule.from_name("cosine", 100)
    x, net = torch.randn(16, 2), MLPDenoiser(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="start_steps"): progressive_distillation(net, sched, x, 12, 4)
    with pytest.raises(ValueError, match="start_steps"): progressive_distillation(net, sched, x, 4, 4)
    with pytest.raises(ValueError, match="end_steps"): progressive_distillation(net, sched, x, 8, 0)
    with pytest.raises(ValueError, match="grid"): distill_round(net, sched, x, torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match="grid"): distill_round(net, sched, x, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="grid"): distill_round(net, sched, x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="iters"): distill_round(net, sched, x, torch.tensor([0, 5]), iters=0)
    with pytest.raises(ValueError, match="x"): distill_round(net, sched, torch.zeros(3), torch.tensor([0, 5]))


@pytest.mark.parametrize("b, d_in, d_out", [(1, 1, 1), (3, 7, 5), (16, 64, 32)])
def test_linear_flops_closed_form(b, d_in, d_out):
    assert flops_per_call(torch.nn.Linear(d_in, d_out), torch.randn(b, d_in)) == 2 * b * d_in * d_out


@pytest.mark.parametrize("b, cin, cout, k, stride, pad, groups, hw", [
    (2, 3, 4, 3, 1, 1, 1, 9), (1, 4, 8, 3, 2, 1, 2, 8), (3, 2, 6, 1, 1, 0, 1, 5), (1, 4, 4, 5, 1, 2, 4, 7)])
def test_conv_flops_closed_form(b, cin, cout, k, stride, pad, groups, hw):
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)
    h_out = (hw + 2 * pad - k) // stride + 1
    assert flops_per_call(conv, torch.randn(b, cin, hw, hw)) == 2 * b * cout * h_out * h_out * (cin // groups) * k * k


def test_cifar_unet_flops_and_params():
    "The cifar config has DDPM's CIFAR-10 size (35.7 M); its FLOPs are the sum of its layers' closed forms."
    net = make_unet("cifar").eval()
    assert round(sum(p.numel() for p in net.parameters()) / 1e5) == 357
    flops = flops_per_call(net, torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    assert 1e10 < flops < 2e10


def test_activation_bytes_and_throughput():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    assert activation_bytes(lin, x) >= x.numel() * 4            # the input is kept for the weight gradient
    with torch.no_grad(): assert activation_bytes(lin, x) == 0  # nothing is kept without autograd
    sched = NoiseSchedule.from_name("cosine", 100)
    ips = train_images_per_s(make_unet("digits", base_channels=8), sched, torch.rand(20, 1, 8, 8) * 2 - 1,
                             batch_size=4, steps=1, warmup=0)
    assert ips > 0
    with pytest.raises(ValueError, match="steps"): train_images_per_s(lin, sched, x, steps=0)


def test_fit_power_law():
    x = np.array([2.0, 4, 8, 16])
    p, c = fit_power_law(x, 3 * x**2.5)
    assert math.isclose(p, 2.5, rel_tol=1e-12) and math.isclose(c, 3, rel_tol=1e-12)
    with pytest.raises(ValueError, match="positive"): fit_power_law([1, 2], [1, 0])
    with pytest.raises(ValueError, match="length"): fit_power_law([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="different"): fit_power_law([2, 2], [1, 3])
    with pytest.raises(ValueError, match="model"): flops_per_call(3, torch.zeros(1))
