"""Contracts of simple_diffusion.future: the latent autoencoder round trip, flow matching's target and
sampler, the exact mixture velocity, bad input."""
import math

import pytest
import torch

from simple_diffusion.data import GaussianMixture, load_digits, toy_mixture
from simple_diffusion.future import (LatentAutoencoder, flow_matching_loss, flow_sample, mixture_velocity,
                                     train_autoencoder)

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

MIX = toy_mixture("gmm8")


def test_autoencoder_shapes_and_scale():
    ae = LatentAutoencoder(latent_channels=3)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (5, 3, 4, 4) and ae.decode(z).shape == (5, 1, 8, 8)
    assert float(ae(x).detach().abs().max()) < 1   # tanh output
    ae.scale.fill_(2.0)                               # the scale divides on the way in, multiplies on the way out
    assert torch.allclose(ae.encode(x) * 2, ae.encoder(x)) and torch.allclose(ae.decode(z), ae.decoder(2 * z))
    assert "scale" in ae.state_dict()                 # saved with the weights


def test_autoencoder_round_trip():
    "A short training run reconstructs held-out digits far better than their mean, with unit-scale latents."
    x, _ = load_digits("train")
    xt, _ = load_digits("test")
    ae, hist = train_autoencoder(x, 2, steps=300, seed=0)
    assert len(hist) == 300 and hist[-1] < hist[0]
    with torch.no_grad():
        err = float((ae(xt) - xt).pow(2).mean())
        z = ae.encode(x)
    baseline = float((xt - x.mean(0)).pow(2).mean())   # the best constant reconstruction
    assert err < 0.2 * baseline, (err, baseline)
    assert abs(float(z.std()) - 1) < 1e-4                 # the scale factor is the training latents' std
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    ae2, _ = train_autoencoder(x[:64], 2, steps=3, seed=0)
    ae3, _ = train_autoencoder(x[:64], 2, steps=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(ae2.state_dict().values(), ae3.state_dict().values()))


def test_flow_matching_target_is_closed_form():
    "The loss's target is x_1 - x_0 = (x_1 - x_t)/(1 - t) on the straight path x_t = (1-t) x_0 + t x_1."
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(500, 3, generator=g, dtype=torch.float64), torch.randn(500, 3, generator=g, dtype=torch.float64)
    t = 0.98 * torch.rand(500, generator=g, dtype=torch.float64)
    seen = {}

    def model(xt, ts):
        seen["xt"], seen["ts"] = xt, ts
        return (x1 - xt) / (1 - ts[:, None] / 1000)
    loss = flow_matching_loss(model, x1, t=t, noise=x0)
    assert loss.shape == (500,) and float(loss.max()) < 1e-20
    assert torch.allclose(seen["xt"], (1 - t[:, None]) * x0 + t[:, None] * x1)
    assert torch.allclose(seen["ts"], 1000 * t)
    zero = flow_matching_loss(lambda xt, ts: torch.zeros_like(xt), x1, t=t, noise=x0)
    assert torch.allclose(zero, (x1 - x0).pow(2).mean(1))
    drawn = flow_matching_loss(lambda xt, ts: torch.zeros_like(xt), x1, generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (500,)


def test_flow_sample_is_euler():
    "dx/dt = a x integrates to x_0 (1 + a/S)^S with S Euler steps; an affine map moves N(0, I) exactly."
    x0 = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = flow_sample(lambda x, ts: 0.5 * x, x0, steps=8)
    assert torch.allclose(out, x0 * (1 + 0.5 / 8) ** 8)
    shift = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.allclose(flow_sample(lambda x, ts: shift.expand_as(x), x0, steps=3), x0 + shift)


def test_mixture_velocity_single_gaussian_closed_form():
    "For x_1 ~ N(m, s^2 I): E[x_1 | x_t] = m + t s^2 (x_t - t m) / (t^2 s^2 + (1-t)^2)."
    m, s = torch.tensor([[1.5, -0.5]], dtype=torch.float64), 0.3
    one = GaussianMixture(m, torch.tensor([s], dtype=torch.float64))
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (0.0, 0.3, 0.9):
        v = t**2 * s**2 + (1 - t) ** 2
        want = (m + t * s**2 / v * (x - t * m) - x) / (1 - t)
        assert torch.allclose(mixture_velocity(one, x, t), want)


def test_mixture_velocity_matches_monte_carlo():
    "E[x_1 - x_0 | x_t ∈ small ball] by rejection from the joint, against the closed form, 5 standard errors."
    g = torch.Generator().manual_seed(0)
    x1 = MIX.sample(400_000, g)[0]
    x0 = torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    t = 0.6
    xt = (1 - t) * x0 + t * x1
    centre = torch.tensor([[1.2, 0.0]], dtype=torch.float64)
    near = (xt - centre).norm(dim=1) < 0.08
    target = (x1 - x0)[near]
    mc, se = target.mean(0), target.std(0) / math.sqrt(len(target))
    exact = mixture_velocity(MIX, xt[near], t).mean(0)   # averaged over the same points: no ball-size bias
    assert near.sum() > 500 and bool(((mc - exact).abs() < 5 * se).all()), (mc, exact, se)


def test_bad_inputs_name_the_argument():
    x = torch.zeros(4, 1, 8, 8)
    ae = LatentAutoencoder(2)
    pts = torch.zeros(4, 2)
    cases = [(lambda: LatentAutoencoder(latent_channels=0), "latent_channels"), (lambda: LatentAutoencoder(width=0), "width"),
             (lambda: ae.encode(torch.zeros(4, 1, 9, 9)), "x"), (lambda: ae.encode([1.0]), "x"),
             (lambda: ae.decode(torch.zeros(4, 3, 4, 4)), "z"),
             (lambda: train_autoencoder(x.long()), "x"), (lambda: train_autoencoder(x, steps=0), "steps"),
             (lambda: train_autoencoder(x, batch_size=0), "batch_size"), (lambda: train_autoencoder(x, lr=-1), "lr"),
             (lambda: train_autoencoder(x, latent_penalty=-1), "latent_penalty"), (lambda: train_autoencoder(x, seed=-1), "seed"),
             (lambda: train_autoencoder(x, latent_channels=0), "latent_channels"),
             (lambda: flow_matching_loss(lambda a, b: a, "x"), "x1"),
             (lambda: flow_matching_loss(lambda a, b: a, pts, t=torch.full((4,), 1.5)), "t"),
             (lambda: flow_matching_loss(lambda a, b: a, pts, t=torch.zeros(3)), "t"),
             (lambda: flow_matching_loss(lambda a, b: a, pts, noise=torch.zeros(4, 3)), "noise"),
             (lambda: flow_matching_loss(lambda a, b: a, pts, time_scale=0), "time_scale"),
             (lambda: flow_sample(lambda a, b: a, pts, steps=0), "steps"),
             (lambda: flow_sample(lambda a, b: a, pts, time_scale=-1), "time_scale"),
             (lambda: flow_sample(lambda a, b: a, "noise"), "noise"),
             (lambda: mixture_velocity(MIX, torch.zeros(4, 3), 0.5), "x"),
             (lambda: mixture_velocity(MIX, pts, 1.0), "t")]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            fn()
