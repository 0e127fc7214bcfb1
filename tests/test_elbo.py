"""Contracts of simple_diffusion.elbo: the variational bound and the training losses."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from simple_diffusion.elbo import (ELBO, discretized_gaussian_log_likelihood, elbo_bpd, hybrid_loss, normal_kl,
                                   prior_bpd, simple_loss, vb_terms_bpd)
from simple_diffusion.forward import q_sample
from simple_diffusion.parameterization import PREDICTIONS, VARIANCES, v_from_x0_eps, x0_from_eps
from simple_diffusion.schedules import NoiseSchedule, get_beta_schedule, rescale_zero_terminal_snr

COS100 = NoiseSchedule.from_name("cosine", 100)


def _levels(shape, seed=0, dtype=torch.float32):
    "Random 8-bit data scaled to [-1, 1], including both end levels."
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g).to(dtype) / 255 * 2 - 1
    x.view(-1)[:2] = torch.tensor([-1.0, 1.0], dtype=dtype)
    return x


# ---------------------------------------------------------------- normal_kl
def test_normal_kl_vs_monte_carlo():
    g = torch.Generator().manual_seed(0)
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.5, 2.0), (1.0, 0.2, -1.0, 0.7), (0.0, 3.0, 0.0, 1.0)]:
        z = m1 + s1 * torch.randn(50_000, generator=g, dtype=torch.float64)
        d = stats.norm(m1, s1).logpdf(z.numpy()) - stats.norm(m2, s2).logpdf(z.numpy())
        kl = float(normal_kl(torch.tensor(m1), torch.tensor(2 * math.log(s1)), m2, 2 * math.log(s2)))
        assert abs(kl - d.mean()) < 5 * d.std() / math.sqrt(len(d))


def test_normal_kl_broadcast_and_zero():
    m = torch.randn(3, 4)
    assert normal_kl(m, torch.zeros(3, 1), m, torch.zeros(1, 4)).abs().max() < 1e-7
    assert normal_kl(m, 0.0, 0.0, torch.zeros(())).shape == (3, 4)
    assert (normal_kl(m, torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)) >= -1e-6).all()


# ------------------------------------------------------ discretized decoder
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_probabilities_sum_to_one_and_match_scipy(dtype):
    levels = torch.linspace(-1, 1, 256, dtype=dtype)
    edges = np.concatenate([[-np.inf], (levels[:-1].double() + 1 / 255).numpy(), [np.inf]])
    for mean in (-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5):
        for log_scale in (-7.0, -3.0, -1.0, 0.0, 2.0, 7.0):
            logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.tensor(log_scale, dtype=dtype))
            assert logp.dtype == dtype and logp.shape == (256,) and torch.isfinite(logp).all()
            p = logp.double().exp()
            # float32 levels sit up to ~6e-8 off the exact grid, which moves the bin edges by as much: at
            # σ = e^-7 ≈ 9e-4 that shifts up to pdf · 6e-8 · 256 ≈ 1e-4 of mass; float64 is exact to round-off
            assert abs(float(p.sum()) - 1) < (1e-9 if dtype == torch.float64 else 2e-4)
            ref = np.diff(stats.norm.cdf(edges, loc=mean, scale=math.exp(log_scale)))
            assert np.abs(p.numpy() - ref).max() < (1e-12 if dtype == torch.float64 else 1e-4)


def test_decoder_tails_finite_with_finite_gradients():
    x = torch.tensor([0.2, -0.2, 1.0, -1.0, 0.0], dtype=torch.float64)
    means = torch.tensor([-0.9, 0.9, -0.9, 0.95, 0.0], dtype=torch.float64, requires_grad=True)
    log_scales = torch.full((5,), math.log(0.005), dtype=torch.float64, requires_grad=True)
    logp = discretized_gaussian_log_likelihood(x, means, log_scales)
    assert torch.isfinite(logp).all() and (logp[:4] < -1000).all()
    logp.sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()
    # the far-tail log-probability agrees with the asymptotic log Φ(z) ≈ -z²/2 - log(-z √(2π)) for one end bin
    z = float((0.95 - (-1 + 1 / 255)) / 0.005)
    assert abs(float(logp[3].detach()) - (-z * z / 2 - math.log(z * math.sqrt(2 * math.pi)))) < 1e-3


def test_decoder_gradient_finite_for_wide_and_narrow_bins():
    x = _levels((64,), dtype=torch.float64)
    for ls in (-8.0, 0.0, 9.0):
        means = torch.zeros(64, dtype=torch.float64, requires_grad=True)
        log_scales = torch.full((64,), ls, dtype=torch.float64, requires_grad=True)
        discretized_gaussian_log_likelihood(x, means, log_scales).sum().backward()
        assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()


# -------------------------------------------------------------- prior_bpd
def test_prior_bpd_linear_is_tiny():
    lin = NoiseSchedule.from_name("linear", 1000)
    x = torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    lt = prior_bpd(lin, x)
    ab = float(np.prod(1 - lin.betas.numpy()))
    assert lt.shape == (2,)
    assert abs(float(lt[0]) / (0.5 * -math.log1p(-ab) / math.log(2)) - 1) < 1e-9
    assert 2.5e-5 < float(lt[0]) < 3.5e-5 and float(lt[1]) < float(lt[0])


# ----------------------------------------------------------- vb_terms_bpd
def test_vb_terms_match_weighted_eps_mse_and_decoder():
    s = NoiseSchedule.from_name("linear", 200)
    g = torch.Generator().manual_seed(3)
    x0 = _levels((16, 1, 3, 3), dtype=torch.float64)
    W = torch.randn(9, 9, generator=g, dtype=torch.float64) / 3
    model = lambda x, t: torch.tanh(x.reshape(len(x), -1) @ W).reshape(x.shape)
    t = torch.randint(1, 200, (16,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = q_sample(s, x0, t, noise=eps)
    mse = ((eps - model(xt, t)) ** 2).reshape(16, -1).mean(1)
    b, a, abp = s.betas[t], s.alphas[t], s.alphas_cumprod_prev[t]
    lam = b / (2 * a * (1 - abp))
    assert torch.allclose(vb_terms_bpd(model, s, x0, xt, t) * math.log(2), lam * mse, rtol=1e-9)
    # decoder at t = 0 with an x0-predicting model: mean = prediction, scale = sqrt(β̃_2)
    x0_hat = (x0 * 0.9).clamp(-1, 1)
    t0 = torch.zeros(16, dtype=torch.long)
    nll = vb_terms_bpd(lambda x, t: x0_hat, s, x0, q_sample(s, x0, t0), t0, prediction="x0")
    sd = math.sqrt(float(s.posterior_variance[1]))
    lo = np.where(x0.numpy() < -0.999, -np.inf, x0.numpy() - 1 / 255)
    hi = np.where(x0.numpy() > 0.999, np.inf, x0.numpy() + 1 / 255)
    ref = -np.log(stats.norm.cdf(hi, x0_hat.numpy(), sd) - stats.norm.cdf(lo, x0_hat.numpy(), sd)).reshape(16, -1).mean(1) / math.log(2)
    assert np.allclose(nll.numpy(), ref, rtol=1e-8)


# --------------------------------------------------------------- elbo_bpd
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_elbo_random_model_finite_and_nonnegative(variance, prediction):
    torch.manual_seed(0)
    out_ch = 2 if variance == "learned_range" else 1
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, out_ch, 3, padding=1))
    x0 = _levels((3, 1, 6, 6))
    res = elbo_bpd(lambda x, t: net(x), COS100, x0, prediction=prediction, variance=variance,
                   batch_timesteps=40, progress=False, generator=torch.Generator().manual_seed(1))
    assert isinstance(res, ELBO)
    assert res.total.shape == res.prior.shape == res.decoder.shape == (3,) and res.terms.shape == (3, 100)
    assert res.total.dtype == torch.float32
    assert torch.isfinite(res.total).all() and (res.terms >= 0).all() and (res.prior >= 0).all()
    assert torch.allclose(res.total, res.prior + res.terms.sum(1)) and torch.equal(res.decoder, res.terms[:, 0])


@pytest.mark.parametrize("k", [1, 7, 100])
def test_elbo_exact_mean_model_is_deterministic(k):
    """Data points c_y and an x0-model that returns c_y: every KL term is 0, the decoder is known in closed form.
    Also checks that model_kwargs (y) are repeated along with the stacked batch."""
    s = NoiseSchedule.from_name("cosine", 50)
    c = _levels((4, 1, 2, 2), seed=5, dtype=torch.float64)
    y = torch.tensor([2, 0, 3, 1, 2])
    x0 = c[y]
    res = elbo_bpd(lambda x, t, y: c[y], s, x0, prediction="x0", batch_timesteps=k, progress=False, model_kwargs={"y": y})
    assert res.terms[:, 1:].abs().max() < 1e-10
    sd = math.sqrt(float(s.posterior_variance[1]))
    x = x0.numpy()
    p = np.where(x < -0.999, stats.norm.cdf(1 / 255 / sd), np.where(x > 0.999, stats.norm.sf(-1 / 255 / sd),
                 stats.norm.cdf(1 / 255 / sd) - stats.norm.cdf(-1 / 255 / sd)))
    assert np.allclose(res.decoder.numpy(), -np.log(p).reshape(5, -1).mean(1) / math.log(2), rtol=1e-8)
    assert torch.allclose(res.total, res.prior + res.decoder)


def test_elbo_progress_bar_runs(capsys):
    res = elbo_bpd(lambda x, t: torch.zeros_like(x), COS100, _levels((2, 1, 2, 2)), batch_timesteps=50, progress=True)
    assert torch.isfinite(res.total).all()


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", [None, "min_snr"])
def test_simple_loss_shape_and_gradients(prediction, weighting):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    loss = simple_loss(lambda x, t: net(x), COS100, _levels((5, 1, 4, 4)), prediction=prediction, weighting=weighting)
    assert loss.shape == (5,) and loss.dtype == torch.float32 and (loss >= 0).all()
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_simple_loss_reproducible_and_t_range():
    x0 = _levels((64, 2))
    seen = []
    model = lambda x, t: (seen.append(t.clone()), torch.zeros_like(x))[1]
    l1 = simple_loss(model, COS100, x0, generator=torch.Generator().manual_seed(7))
    l2 = simple_loss(model, COS100, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(l1, l2) and torch.equal(seen[0], seen[1])
    assert seen[0].min() >= 0 and seen[0].max() < 100 and len(seen[0].unique()) > 20


def test_min_snr_same_weighting_for_all_targets():
    g = torch.Generator().manual_seed(2)
    s = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randn(32, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(32, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (32,), generator=g)
    xt = q_sample(s, x0, t, noise=eps)
    eps_hat = eps + 0.3 * torch.randn(32, 3, generator=g, dtype=torch.float64)
    x0_hat = x0_from_eps(s, xt, t, eps_hat)
    outs = {"eps": eps_hat, "x0": x0_hat, "v": v_from_x0_eps(s, x0_hat, t, eps_hat)}
    x0_mse = ((x0 - x0_hat) ** 2).mean(1)
    for gamma in (1.0, 5.0):
        for p, o in outs.items():
            w = simple_loss(lambda x, tt: o, s, x0, t=t, noise=eps, prediction=p, weighting="min_snr", min_snr_gamma=gamma)
            assert torch.allclose(w, s.snr[t].clamp(max=gamma) * x0_mse, rtol=1e-8), (p, gamma)


def test_min_snr_zero_terminal_snr_is_finite():
    s = NoiseSchedule(rescale_zero_terminal_snr(get_beta_schedule("linear", 100)))
    x0 = _levels((4, 2))
    t = torch.full((4,), 99)
    for p in PREDICTIONS:
        loss = simple_loss(lambda x, tt: torch.zeros_like(x), s, x0, t=t, prediction=p, weighting="min_snr")
        assert torch.isfinite(loss).all()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_hybrid_loss_stop_gradient(prediction):
    g = torch.Generator().manual_seed(4)
    x0 = _levels((6, 2, 3, 3), dtype=torch.float64)
    out = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t, e = torch.randint(0, 100, (6,), generator=g), torch.randn(x0.shape, generator=g, dtype=torch.float64)
    h = hybrid_loss(lambda x, tt: out, COS100, x0, t=t, noise=e, prediction=prediction)
    assert h.shape == (6,)
    h.sum().backward()
    gh = out.grad.clone(); out.grad = None
    simple_loss(lambda x, tt: out[:, :2], COS100, x0, t=t, noise=e, prediction=prediction).sum().backward()
    assert torch.allclose(gh[:, :2], out.grad[:, :2], atol=1e-12)     # the bound gives the mean no gradient
    assert gh[:, 2:].abs().sum() > 0                                   # but trains the variance channels
    # the vlb part equals λ T times the learned-range bound term
    vb = vb_terms_bpd(lambda x, tt: out.detach(), COS100, x0, q_sample(COS100, x0, t, noise=e), t, prediction=prediction, variance="learned_range")
    mse = simple_loss(lambda x, tt: out[:, :2].detach(), COS100, x0, t=t, noise=e, prediction=prediction)
    assert torch.allclose(h.detach(), mse + 1e-3 * 100 * vb, rtol=1e-10)


def test_hybrid_loss_toy_data_gaussian_decoder():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 4)
    x0 = torch.randn(16, 2) * 2                        # outside [-1, 1]: needs the continuous decoder
    loss = hybrid_loss(lambda x, t: net(x), COS100, x0, decoder="gaussian", t=torch.arange(16))
    assert loss.shape == (16,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert net.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x must lie"):
        hybrid_loss(lambda x, t: net(x), COS100, x0, t=torch.arange(16))


# --------------------------------------------------------------- bad input
Z = torch.zeros(4, 1, 4, 4)
T4 = torch.zeros(4, dtype=torch.long)
ident = lambda x, t: x


@pytest.mark.parametrize("call, word", [
    (lambda: normal_kl(torch.zeros(3), torch.zeros(4), 0.0, 0.0), "logvar1"),
    (lambda: normal_kl(0.0, 0.0, 0.0, 0.0), "tensor"),
    (lambda: discretized_gaussian_log_likelihood(Z - 1.01, Z, torch.zeros(())), "x must lie in"),
    (lambda: discretized_gaussian_log_likelihood(Z, Z[:, :, :2], torch.zeros(())), "means"),
    (lambda: discretized_gaussian_log_likelihood(Z, Z, torch.full((4, 1, 1, 1), float("nan"))), "log_scales"),
    (lambda: discretized_gaussian_log_likelihood(Z, Z, torch.zeros(5)), "log_scales"),
    (lambda: discretized_gaussian_log_likelihood(Z.long(), Z, torch.zeros(())), "x must be a floating"),
    (lambda: prior_bpd(COS100, Z.long()), "x0"),
    (lambda: vb_terms_bpd(ident, COS100, Z, Z[:2], T4), "xt"),
    (lambda: vb_terms_bpd(ident, COS100, Z, Z, torch.full((4,), 100)), "t must lie"),
    (lambda: vb_terms_bpd(ident, COS100, Z, Z, T4, decoder="logistic"), "decoder"),
    (lambda: vb_terms_bpd(ident, COS100, Z, Z, T4, prediction="score"), "prediction"),
    (lambda: vb_terms_bpd(ident, COS100, Z, Z, T4, variance="learned"), "variance"),
    (lambda: elbo_bpd(ident, COS100, Z, variance="fixed", progress=False), "variance"),
    (lambda: elbo_bpd(ident, COS100, Z, prediction="score", progress=False), "prediction"),
    (lambda: elbo_bpd(ident, COS100, Z, batch_timesteps=0, progress=False), "batch_timesteps"),
    (lambda: elbo_bpd(ident, COS100, Z + 2, progress=False), "x must lie"),
    (lambda: elbo_bpd(ident, COS100, Z, variance="learned_range", progress=False), "model output"),
    (lambda: simple_loss(ident, COS100, Z, prediction="score"), "prediction"),
    (lambda: simple_loss(ident, COS100, Z, weighting="p2"), "weighting"),
    (lambda: simple_loss(ident, COS100, Z, min_snr_gamma=0), "min_snr_gamma"),
    (lambda: simple_loss(ident, COS100, Z, t=torch.full((4,), 100)), "t must lie"),
    (lambda: simple_loss(ident, COS100, Z, t=torch.zeros(3, dtype=torch.long)), "B=4"),
    (lambda: simple_loss(ident, COS100, Z, noise=torch.zeros(4, 16)), "noise"),
    (lambda: simple_loss(ident, COS100, Z, model_kwargs=[1]), "model_kwargs"),
    (lambda: simple_loss(lambda x, t: torch.cat([x, x], 1), COS100, Z), "hybrid_loss"),
    (lambda: hybrid_loss(ident, COS100, Z), "model output"),
    (lambda: hybrid_loss(ident, COS100, torch.zeros(4)), "channel"),
    (lambda: hybrid_loss(lambda x, t: torch.cat([x, x], 1), COS100, Z, decoder="logistic"), "decoder"),
])
def test_bad_input(call, word):
    with pytest.raises(ValueError, match=word):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_input():
    s = NoiseSchedule.from_name("cosine", 50).to("cuda")
    net = torch.nn.Conv2d(1, 2, 3, padding=1).cuda()
    x0 = _levels((3, 1, 4, 4)).cuda()
    res = elbo_bpd(lambda x, t: net(x), s, x0, variance="learned_range", batch_timesteps=25, progress=False)
    assert res.total.device.type == "cuda" and torch.isfinite(res.total).all() and (res.terms >= 0).all()
    h = hybrid_loss(lambda x, t: net(x), s, x0, generator=torch.Generator(device="cuda").manual_seed(0))
    assert h.device.type == "cuda" and h.shape == (3,)
    h.mean().backward()
    l = simple_loss(lambda x, t: net(x)[:, :1], s, x0, weighting="min_snr")
    assert l.device.type == "cuda"


def test_discretized_likelihood_against_scipy_after_the_one_sync_checks():
    "Issue 17 folded the decoder's four checks into one host read; the values must still be the Gaussian's bin masses (scipy, independent)."
    from scipy.stats import norm
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 1 - 2 / 255, 1.0], dtype=torch.float64)
    mean, log_scale = torch.tensor([-0.9, -0.5, 0.1, 0.7, 0.95], dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    sd, xs, ms = math.exp(-1.5), x.numpy(), mean.numpy()
    hi, lo = norm.cdf((xs + 1 / 255 - ms) / sd), norm.cdf((xs - 1 / 255 - ms) / sd)
    want = np.log(np.where(xs < -0.999, hi, np.where(xs > 0.999, 1 - lo, hi - lo)))   # end bins open
    np.testing.assert_allclose(got, want, rtol=1e-9)
    for bad, fragment in ((x * float("nan"), "x must lie"), (x * 2, "x must lie")):
        with pytest.raises(ValueError, match=fragment):
            discretized_gaussian_log_likelihood(bad, mean, log_scale)
    with pytest.raises(ValueError, match="log_scales must be finite"):
        discretized_gaussian_log_likelihood(x, mean, torch.tensor(float("inf")))
