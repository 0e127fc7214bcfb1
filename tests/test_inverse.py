"""Contracts of simple_diffusion.inverse: operators, the exact posterior, every method against it, bad input."""
import math

import pytest
import torch

from simple_diffusion.data import GaussianMixture
from simple_diffusion.inverse import (METHODS, MaskOperator, MatrixOperator, PoolOperator, gmm_posterior, image_task,
                                      inpaint, mcgdiff_problem, method_options, network_calls, repaint_schedule,
                                      sliced_wasserstein, solve_inverse, super_resolve)
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

SCHED = NoiseSchedule.from_name("linear", 1000)
MIX2 = GaussianMixture([[-1.0, -0.5], [1.0, 0.5]], [0.3, 0.3])
ORACLE2 = GaussianMixtureOracle(MIX2, SCHED)
# a 4-pixel "image" prior [1, 2, 2] for the image-shaped operators
MIX4 = GaussianMixture([[-0.5, 0.5, 0.0, 0.3], [0.5, -0.5, 0.2, -0.3]], [0.2, 0.3])
ORACLE4 = GaussianMixtureOracle(MIX4, SCHED)
KW = dict(steps=30, sigma_y=0.05, jump=5, resamples=2, particles=4, zeta=0.5)


def gen(k): return torch.Generator().manual_seed(k)


def importance_check(mix, op, y, sigma_y, n=200_000):
    "max over the first two moments of |closed form - self-normalised importance sampling| / standard error."
    x, _ = mix.sample(n, gen(0))
    r = op.flat_y(op.A(x)) - op.flat_y(y[None].double())
    w = (-0.5 * r.square().sum(1) / sigma_y**2).softmax(0)
    z = gmm_posterior(mix, op, y, sigma_y).sample(n, gen(1))
    n_eff, worst = 1 / w.square().sum(), 0.0
    for f in (lambda v: v, lambda v: v**2):
        est, exact = (w[:, None] * f(x)).sum(0), f(z).mean(0)
        se = ((w[:, None] * (f(x) - est) ** 2).sum(0) / n_eff + f(z).var(0) / n).sqrt()
        worst = max(worst, float(((est - exact).abs() / se).max()))
    return worst


def test_posterior_matches_importance_sampling_1d_2d():
    mix1 = GaussianMixture([[-2.0], [0.5], [3.0]], [0.3, 1.0, 0.5], [0.2, 0.5, 0.3])
    assert importance_check(mix1, MatrixOperator(torch.tensor([[1.0]])), torch.tensor([1.2]), 0.8) < 5   # 5 s.e.
    mix2 = GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], [[0.5, 1.0], [0.7, 0.4], [1.0, 1.0]])
    assert importance_check(mix2, MatrixOperator(torch.tensor([[1.0, 1.0]])), torch.tensor([0.7]), 0.5) < 5
    assert importance_check(mix2, MaskOperator(torch.tensor([0.0, 1.0])), torch.tensor([0.0, -1.0]), 0.3) < 5


def test_posterior_noiseless_mask_pins_known_coordinates():
    post = gmm_posterior(MIX4, MaskOperator(torch.tensor([1, 0, 1, 0])), torch.tensor([0.3, 9.0, -0.2, 9.0]), 0.0)
    x = post.sample(100, gen(0))
    assert torch.allclose(x[:, [0, 2]], torch.tensor([0.3, -0.2], dtype=torch.float64), atol=1e-5)
    assert abs(float(post.weights.sum()) - 1) < 1e-12


@pytest.mark.parametrize("op", [MaskOperator((torch.rand(1, 4, 4, generator=gen(0)) < 0.5).float()),
                                PoolOperator(2, (1, 4, 4)), PoolOperator(4, (1, 4, 4)),
                                MatrixOperator(torch.randn(2, 5, generator=gen(1), dtype=torch.float64))])
def test_operator_adjoint_pinv_solve(op):
    x = torch.randn(3, *op.x_shape, generator=gen(2), dtype=torch.float64)
    v = op.A(torch.randn(3, *op.x_shape, generator=gen(3), dtype=torch.float64))
    assert abs(float((op.A(x) * v).sum() - (x * op.At(v)).sum())) < 1e-10
    assert torch.allclose(op.A(op.pinv(v)), v, atol=1e-10)
    w = op.solve(v, 0.7, 0.2)
    assert torch.allclose(0.7 * op.A(op.At(w)) + 0.2 * w, v, atol=1e-10)
    M = op.matrix()
    assert torch.allclose(op.flat_y(op.A(x)), x.reshape(3, -1) @ M.T, atol=1e-10)


def test_sliced_wasserstein_gaussian_shift():
    m = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)    # SW = ‖m‖ / √d = 2.5
    sw = sliced_wasserstein(torch.randn(20_000, 4, generator=gen(1), dtype=torch.float64),
                            torch.randn(20_000, 4, generator=gen(2), dtype=torch.float64) + m, 2000, gen(3))
    assert abs(sw - 2.5) < 0.15    # 5 sd of the direction average (relative sd 1/(2√2000))


@pytest.mark.parametrize("method", METHODS)
def test_empty_mask_reproduces_prior(method):
    prior = lambda n, k: MIX2.sample(n, gen(k))[0].float()
    floor = sliced_wasserstein(prior(400, 1), prior(2000, 2), generator=gen(0))
    out = solve_inverse(ORACLE2, SCHED, MaskOperator(torch.zeros(2)), prior(400, 3), method, generator=gen(4), **KW)
    assert sliced_wasserstein(out, prior(2000, 2), generator=gen(0)) < 3 * floor   # noise + 30-step discretisation


@pytest.mark.parametrize("method", METHODS)
def test_full_mask_returns_y(method):
    y = MIX2.sample(200, gen(0))[0].float()
    out = solve_inverse(ORACLE2, SCHED, MaskOperator(torch.ones(2)), y, method, generator=gen(1), **KW)
    err = (out - y).abs().mean().item()
    free = (MIX2.sample(200, gen(9))[0].float() - y).abs().mean().item()
    tol = {"replacement": 1e-6, "repaint": 1e-6, "pigdm": 5 * 0.05, "tds": 5 * 0.05, "dps": free / 2}[method]
    assert err < tol, (method, err, tol)


@pytest.mark.parametrize("method", ["replacement", "repaint"])
def test_known_pixels_equal_y(method):
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = torch.randn(16, 1, 2, 2, generator=gen(0))
    out = inpaint(ORACLE4, SCHED, y, mask, method, steps=20, jump=3, resamples=3, generator=gen(1))
    assert out.shape == y.shape and torch.equal(out * mask, y * mask)
    assert not torch.allclose(out * (1 - mask), y * (1 - mask))


def test_repaint_r1_equals_replacement():
    op = MaskOperator(torch.tensor([1.0, 0.0]))
    y = MIX2.sample(50, gen(0))[0].float()
    a = solve_inverse(ORACLE2, SCHED, op, y, "replacement", steps=25, generator=gen(5))
    b = solve_inverse(ORACLE2, SCHED, op, y, "repaint", steps=25, jump=4, resamples=1, generator=gen(5))
    assert torch.equal(a, b)
    c = solve_inverse(ORACLE2, SCHED, op, y, "repaint", steps=25, jump=4, resamples=3, generator=gen(5))
    assert not torch.equal(a, c)


def test_repaint_cost():
    assert network_calls("repaint", 250, jump=10, resamples=10) == 2410     # ≈ 9.6× of 250
    assert network_calls("repaint", 250, jump=10, resamples=1) == 250
    path = repaint_schedule(6, 2, 2)
    assert path[0] == 5 and path[-1] == -1 and all(abs(a - b) == 1 for a, b in zip(path[:-1], path[1:]))
    assert network_calls("tds", 10, particles=8) == 80
    for m in METHODS:
        o = method_options(m, 50)
        assert network_calls(m, o["steps"], jump=o.get("jump", 1), resamples=o.get("resamples", 1),
                             particles=o.get("particles", 1)) <= 50


def test_tds_error_falls_with_particles():
    mix, op, sig, y = mcgdiff_problem(2, 1, gen(3))
    ref = gmm_posterior(mix, op, y, sig).sample(4000, gen(0))
    oracle = GaussianMixtureOracle(mix, SCHED)
    v0 = float((mix.weights @ (mix.means**2 + 1) - (mix.weights @ mix.means) ** 2).mean())
    sw = {}
    for N in (1, 32):
        out = solve_inverse(oracle, SCHED, op, y.expand(1000, 1).float(), "tds", steps=30, sigma_y=sig,
                            particles=N, x0_var=v0, generator=gen(1))
        sw[N] = sliced_wasserstein(out, ref, generator=gen(2))
    assert sw[32] < 0.5 * sw[1], sw    # measured: 0.93 -> 0.14 (exact draws of the same size: 0.05)


@pytest.mark.parametrize("method", METHODS)
def test_shapes_dtypes_images(method):
    y = torch.randn(3, 1, 2, 2, generator=gen(0))
    out = inpaint(ORACLE4, SCHED, y, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), method, steps=8, particles=2,
                  sigma_y=0.1, generator=gen(1))
    assert out.shape == (3, 1, 2, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()
    low = torch.randn(3, 1, 1, 1, generator=gen(2))
    sr = super_resolve(ORACLE4, SCHED, low, 2, method, steps=8, particles=2, sigma_y=0.1, generator=gen(3))
    assert sr.shape == (3, 1, 2, 2) and torch.isfinite(sr).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_follows_inputs():
    y = torch.randn(4, 2, device="cuda")
    out = solve_inverse(ORACLE2, SCHED, MaskOperator(torch.tensor([1.0, 0.0], device="cuda")), y, "pigdm", steps=5)
    assert out.device.type == "cuda"


def test_image_tasks():
    for name in ("bottom half", "right half", "centre 4x4", "random 50%"):
        op = image_task(name, (1, 8, 8), gen(0))
        assert isinstance(op, MaskOperator) and 0 < op.mask.sum() < 64
    assert image_task("bottom half").mask[0, :4].all() and not image_task("bottom half").mask[0, 4:].any()
    assert isinstance(image_task("super-resolution 2x"), PoolOperator)


def test_bad_input():
    y = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="mask"): inpaint(ORACLE4, SCHED, y, torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="mask"): inpaint(ORACLE4, SCHED, y, torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="factor"): PoolOperator(3, (1, 8, 8))
    with pytest.raises(ValueError, match="factor"): super_resolve(ORACLE4, SCHED, torch.randn(2, 1, 1, 1), 0)
    op = MaskOperator(torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="y"): solve_inverse(ORACLE4, SCHED, op, torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="y"): solve_inverse(ORACLE4, SCHED, op, torch.full((2, 1, 2, 2), math.inf))
    with pytest.raises(ValueError, match="y"): solve_inverse(ORACLE4, SCHED, op, torch.full((2, 1, 2, 2), math.nan))
    with pytest.raises(ValueError, match="method"): solve_inverse(ORACLE4, SCHED, op, y, "magic")
    with pytest.raises(ValueError, match="sigma_y"): solve_inverse(ORACLE4, SCHED, op, y, "tds")
    with pytest.raises(ValueError, match="sigma_y"): solve_inverse(ORACLE4, SCHED, op, y, sigma_y=-1.0)
    with pytest.raises(ValueError, match="steps"): solve_inverse(ORACLE4, SCHED, op, y, steps=0)
    with pytest.raises(ValueError, match="operator"): solve_inverse(ORACLE4, SCHED, "mask", y)
    with pytest.raises(ValueError, match="particles"): solve_inverse(ORACLE4, SCHED, op, y, "tds", sigma_y=0.1, particles=0)
    with pytest.raises(ValueError, match="jump"): solve_inverse(ORACLE4, SCHED, op, y, "repaint", jump=0)
    with pytest.raises(ValueError, match="zeta"): solve_inverse(ORACLE4, SCHED, op, y, "dps", zeta=0.0)
    with pytest.raises(ValueError, match="M"): MatrixOperator(torch.ones(2, 4))
    with pytest.raises(ValueError, match="sigma_y"): gmm_posterior(MIX4, op, y[0], -0.1)
    with pytest.raises(ValueError, match="method"): network_calls("magic")
    with pytest.raises(ValueError, match="name"): image_task("left half")
