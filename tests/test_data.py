"""Contracts of simple_diffusion.data (embedded digits, toy distributions, Gaussian mixtures)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from simple_diffusion.data import TOY_DATASETS, GaussianMixture, load_digits, make_toy, toy_mixture


def test_digits_split_and_range():
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert len(xtr) + len(xte) == 1797 and len(xte) == pytest.approx(0.2 * 1797, abs=10)
    assert xtr.min() >= -1 and xtr.max() <= 1 and set(ytr.tolist()) == set(range(10))
    # the raw sklearn pixels (0..16) map linearly onto [-1, 1]
    from sklearn.datasets import load_digits as sk
    raw = torch.from_numpy(sk().images).float()
    xa, ya = load_digits("all")
    torch.testing.assert_close(xa[:, 0], raw / 8 - 1)
    assert torch.equal(ya, torch.from_numpy(sk().target))


def test_digits_pad_and_resize():
    x, _ = load_digits("test", pad=4)
    assert x.shape[-2:] == (16, 16) and (x[..., :4, :] == -1).all()
    y, _ = load_digits("test", pad=4, size=32)
    assert y.shape[-2:] == (32, 32) and y.min() >= -1 and y.max() <= 1
    z, _ = load_digits("test", size=4)
    assert z.shape[-2:] == (4, 4)


@pytest.mark.parametrize("kwargs,word", [
    (dict(split="validation"), "split"), (dict(test_fraction=0), "test_fraction"),
    (dict(test_fraction=1.5), "test_fraction"), (dict(pad=-2), "pad"), (dict(pad=1.5), "pad"),
    (dict(size=0), "size"),
])
def test_digits_bad_input(kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_digits(**kwargs)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toys(name):
    x = make_toy(name, 1000, seed=3)
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, make_toy(name, 1000, seed=3))


@pytest.mark.parametrize("call,word", [
    (lambda: make_toy("circles", 10), "moons"), (lambda: make_toy("moons", 0), "n"),
    (lambda: toy_mixture("moons"), "gmm25"), (lambda: GaussianMixture([[0.0]], [-1.0]), "stds"),
    (lambda: GaussianMixture([0.0, 1.0], [1.0, 1.0]), "means"),
    (lambda: GaussianMixture([[0.0], [1.0]], [1.0, 1.0], weights=[0.3, 0.3]), "weights"),
    (lambda: toy_mixture("gmm8").log_prob(torch.zeros(3, 3)), "x must be"),
])
def test_toy_bad_input(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_mixture_log_prob_against_scipy():
    g = GaussianMixture(means=[[0.0, 1.0, -1.0], [2.0, -1.0, 0.5]], stds=[[0.5, 1.0, 2.0], [1.0, 0.3, 0.7]], weights=[0.3, 0.7])
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    ref = np.log(sum(w * stats.multivariate_normal(m, np.diag(s ** 2)).pdf(x.numpy())
                     for w, m, s in zip(g.weights.numpy(), g.means.numpy(), g.stds.numpy())))
    np.testing.assert_allclose(g.log_prob(x).numpy(), ref, rtol=1e-10)


def test_mixture_samples_follow_weights():
    g = GaussianMixture(means=[[-5.0], [0.0], [5.0]], stds=[0.5, 0.5, 0.5], weights=[0.2, 0.5, 0.3])
    x, k = g.sample(30_000, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(k, minlength=3).double()
    expect = 30_000 * g.weights
    assert ((counts - expect).abs() < 5 * (expect * (1 - g.weights)).sqrt()).all()
    # within each component: mean and standard deviation match (5 s.e.)
    for j in range(3):
        xj = x[k == j, 0]
        assert abs(xj.mean().item() - g.means[j, 0].item()) < 5 * 0.5 / math.sqrt(len(xj))
        assert abs(xj.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * len(xj))


def test_gmm25_has_25_equal_modes():
    g = toy_mixture("gmm25")
    assert g.means.shape == (25, 2) and torch.allclose(g.weights, torch.full((25,), 1 / 25, dtype=torch.float64))
