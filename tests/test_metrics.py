"""Contracts of simple_diffusion.metrics: FID, KID, IS, precision/recall, density/coverage, the digits classifier."""
import json
import math
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import simple_diffusion.metrics as M
from simple_diffusion.data import GaussianMixture, load_digits
from simple_diffusion.metrics import (DigitsClassifier, density_coverage, evaluate_samples, extract_features,
                                      fid_from_features, frechet_distance, inception_features, inception_score, kid,
                                      load_digits_classifier, precision_recall, save_digits_classifier,
                                      train_digits_classifier)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clf():
    return load_digits_classifier()


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def _eig_fid(mu1, s1, mu2, s2):
    "Independent route: tr sqrt(Σ1 Σ2) = Σ sqrt(eig(Σ1^½ Σ2 Σ1^½)), via symmetric eigendecompositions."
    w, V = np.linalg.eigh(s1)
    r = (V * np.sqrt(w.clip(0))) @ V.T
    lam = np.linalg.eigvalsh(r @ s2 @ r).clip(0)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum()


# ---------------------------------------------------------------- Fréchet distance
def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        a, b, m1, m2 = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d), rng.normal(size=d), rng.normal(size=d)
        want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
        # the two routes share no code; 1e-10 relative is far above float64 rounding for d <= 64
        assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("d", [3, 20, 64])
def test_frechet_matches_eigenvalue_route(d):
    rng = np.random.default_rng(d)
    A, B = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d + 1))
    s1, s2, m1, m2 = A @ A.T / d, B @ B.T / d, rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(_eig_fid(m1, s1, m2, s2), rel=1e-8)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-8)  # symmetric


def test_fid_identical_sets_is_zero():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    tr = np.trace(np.cov(f, rowvar=False))
    # sqrtm(Σ²) is accurate to ~sqrt(cond) × machine precision; 1e-6 of tr Σ is the scale of every term
    assert abs(fid_from_features(f, f)) < 1e-6 * tr
    assert abs(fid_from_features(f, f[::-1])) < 1e-6 * tr
    assert fid_from_features(torch.from_numpy(f).float(), f) == pytest.approx(0, abs=1e-3 * tr)   # torch input works


def test_fid_mean_shift_only():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(300, 8))
    shift = np.arange(8.0)
    assert fid_from_features(f, f + shift) == pytest.approx((shift ** 2).sum(), rel=1e-8)


def test_frechet_eps_retry_adds_eps_to_both(monkeypatch):
    "When sqrtm is not finite, the root is recomputed from (Σ1 + εI)(Σ2 + εI), with a warning."
    calls, real = [], M.linalg.sqrtm
    def fake(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)
    monkeypatch.setattr(M.linalg, "sqrtm", fake)
    s1, s2 = np.diag([1.0, 0.0, 2.0]), np.diag([0.5, 1.0, 0.0])
    with pytest.warns(UserWarning, match="eps=0.001"):
        out = frechet_distance(np.zeros(3), s1, np.zeros(3), s2, eps=1e-3)
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(3)) @ (s2 + 1e-3 * np.eye(3)))
    assert out == pytest.approx(_eig_fid(np.zeros(3), s1 + 1e-3 * np.eye(3), np.zeros(3), s2 + 1e-3 * np.eye(3)) - 2 * 3e-3, abs=1e-9)


def test_frechet_singular_covariances_stay_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 40)), rng.normal(size=(20, 40))          # N=20 < d=40: rank-19 covariances
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    want = _eig_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert math.isfinite(out) and out == pytest.approx(want, rel=1e-4)


def test_frechet_imaginary_part_threshold(monkeypatch):
    real = M.linalg.sqrtm
    s = np.diag([2.0, 4.0])                               # mean variance s = 3: threshold 3e-3
    for imag, ok in ((1e-3, True), (1e-2, False)):
        monkeypatch.setattr(M.linalg, "sqrtm", lambda a, imag=imag: real(a) + 1j * imag)
        if ok: assert frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0, abs=1e-9)
        else:
            with pytest.raises(ValueError, match="imaginary"):
                frechet_distance(np.zeros(2), s, np.zeros(2), s)


@pytest.mark.parametrize("call,word", [
    (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3)), "mu2"),
    (lambda: frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), "sigma1"),
    (lambda: frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
    (lambda: frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2)), "finite"),
    (lambda: frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2)), "imaginary"),
    (lambda: fid_from_features(np.zeros((10, 4)), np.zeros((10, 5))), "same feature dimension"),
    (lambda: fid_from_features(np.zeros(10), np.zeros((10, 1))), "feats_a"),
    (lambda: fid_from_features(np.zeros((10, 2)), np.zeros((1, 2))), "feats_b"),
])
def test_fid_bad_input(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_fid_fewer_samples_than_dims_warns():
    rng = np.random.default_rng(4)
    with pytest.warns(UserWarning, match=r"N=30 <= d=64"):
        out = fid_from_features(rng.normal(size=(30, 64)), rng.normal(size=(500, 64)))
    assert math.isfinite(out)


# ---------------------------------------------------------------- KID
def _mmd2_loop(X, Y):
    d = len(X[0])
    k = lambda u, v: (sum(a * b for a, b in zip(u, v)) / d + 1) ** 3
    m, n = len(X), len(Y)
    return (sum(k(X[i], X[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            + sum(k(Y[i], Y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            - 2 * sum(k(x, y) for x in X for y in Y) / (m * n))


def test_kid_matches_double_loop():
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(6, 3)), rng.normal(1, 2, size=(8, 3))
    mean, std = kid(X, Y, subsets=3, subset_size=50)        # subsets hold every point: all equal
    assert mean == pytest.approx(_mmd2_loop(X.tolist(), Y.tolist()), rel=1e-10) and std == pytest.approx(0, abs=1e-12)


def test_kid_unbiased_for_same_distribution():
    "Mean over independent repetitions within 5 standard errors of 0; FID on the same data is far above 0."
    rng = np.random.default_rng(6)
    vals, fids = [], []
    for _ in range(60):
        a, b = rng.normal(size=(100, 16)), rng.normal(size=(100, 16))
        vals.append(kid(a, b, subsets=1, subset_size=100)[0]); fids.append(fid_from_features(a, b))
    vals, fids = np.array(vals), np.array(fids)
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert abs(vals.mean()) < 5 * se
    assert fids.mean() > 20 * fids.std(ddof=1) / math.sqrt(len(fids))       # FID's small-sample bias
    a, b = rng.normal(size=(100, 16)), rng.normal(0.5, 1, size=(100, 16))
    m, s = kid(a, b, subsets=20, subset_size=50)
    assert m > 5 * s                                                           # a real difference is seen


def test_kid_subsets_are_seeded():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8))
    assert kid(a, b, subsets=5, subset_size=50, seed=3) == kid(a, b, subsets=5, subset_size=50, seed=3)
    assert kid(a, b, subsets=5, subset_size=50, seed=3) != kid(a, b, subsets=5, subset_size=50, seed=4)


@pytest.mark.parametrize("kw,word", [(dict(subsets=0), "subsets"), (dict(subset_size=1), "subset_size"),
                                     (dict(subsets=2.5), "subsets")])
def test_kid_bad_input(kw, word):
    with pytest.raises(ValueError, match=word):
        kid(np.zeros((10, 3)), np.zeros((10, 3)), **kw)
    with pytest.raises(ValueError, match="same feature dimension"):
        kid(np.zeros((10, 3)), np.zeros((10, 4)))


# ---------------------------------------------------------------- Inception Score
@pytest.mark.parametrize("K", [2, 10, 100])
def test_inception_score_extremes(K):
    m, s = inception_score(np.full((300, K), 1 / K), splits=3)
    assert m == pytest.approx(1, abs=1e-12) and s == pytest.approx(0, abs=1e-12)
    m, s = inception_score(np.tile(np.eye(K), (6, 1)), splits=3)           # balanced, confident in every split
    assert m == pytest.approx(K, rel=1e-12) and s == pytest.approx(0, abs=1e-9)
    m, _ = inception_score(np.tile(np.eye(K)[:1], (6 * K, 1)), splits=3)    # confident but one class only
    assert m == pytest.approx(1, abs=1e-12)


def test_inception_score_matches_entropy_form():
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.ones(7) * 0.3, size=200)
    H = lambda q: -(q * np.log(q)).sum(-1)
    want = math.exp(H(p.mean(0)) - H(p).mean())                 # Eq. (eq-metrics-is), second form
    assert inception_score(p, splits=1)[0] == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("p,kw,word", [
    (np.full((10, 4), 0.3), {}, "sum to 1"),
    (np.full((10, 4), 0.25) + np.array([1e-3, 0, 0, 0]), {}, "sum to 1"),
    (np.array([[1.5, -0.5]] * 4), {}, "non-negative"),
    (np.full((10, 4), 0.25), dict(splits=0), "splits"),
    (np.full((10, 4), 0.25), dict(splits=11), "splits"),
    (np.full(4, 0.25), {}, "probs"),
])
def test_inception_score_bad_input(p, kw, word):
    with pytest.raises(ValueError, match=word):
        inception_score(p, **kw)
    assert inception_score(np.full((10, 4), 0.25) + 5e-5 * np.array([1, -1, 0, 0]))[0] == pytest.approx(1, abs=1e-6)  # within 1e-4: accepted


# ---------------------------------------------------------------- precision / recall / density / coverage
def _prdc_brute(x, y, k_pr, k_dc):
    from sklearn.neighbors import NearestNeighbors
    rad = lambda z, k: NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)[0][:, k]
    rx, ry, rx5 = rad(x, k_pr), rad(y, k_pr), rad(x, k_dc)
    dist = np.linalg.norm(x[:, None] - y[None], axis=-1)          # [N, M]
    return ((dist <= rx[:, None]).any(0).mean(), (dist <= ry[None, :]).any(1).mean(),
            (dist <= rx5[:, None]).sum() / (k_dc * len(y)), (dist <= rx5[:, None]).any(1).mean())


def test_prdc_match_brute_force():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(120, 5)), rng.normal(0.2, 1.2, size=(90, 5))
    got = (*precision_recall(x, y, k=3), *density_coverage(x, y, k=5))
    np.testing.assert_allclose(got, _prdc_brute(x, y, 3, 5), atol=1e-12)
    # chunking does not change anything
    assert M._knn_radii(x, 3, chunk=7).tolist() == M._knn_radii(x, 3).tolist()


def test_density_coverage_expectations():
    "E[density] = 1 and E[coverage] = 1 - prod_l (N-l)/(N+M-l) for identical distributions (5 standard errors)."
    rng = np.random.default_rng(10)
    N, Mn, k, R = 150, 100, 5, 80
    dc = np.array([density_coverage(rng.normal(size=(N, 6)), rng.normal(size=(Mn, 6)), k=k) for _ in range(R)])
    want = 1 - np.prod([(N - l) / (N + Mn - l) for l in range(1, k + 1)])
    for got, w in ((dc[:, 0], 1.0), (dc[:, 1], want)):
        assert abs(got.mean() - w) < 5 * got.std(ddof=1) / math.sqrt(R)


def test_collapse_and_noise():
    rng = np.random.default_rng(11)
    mix = GaussianMixture(torch.from_numpy(rng.normal(0, 4, size=(10, 16))), torch.ones(10))
    g = torch.Generator().manual_seed(0)
    real = mix.sample(800, g)[0].numpy()
    fresh = mix.sample(800, g)[0].numpy()
    collapsed = mix.means[3].numpy() + torch.randn(800, 16, generator=g, dtype=torch.float64).numpy()
    noisy = fresh + 2 * rng.normal(size=fresh.shape)
    p_f, r_f = precision_recall(real, fresh)
    p_c, r_c = precision_recall(real, collapsed)
    p_n, r_n = precision_recall(real, noisy)
    assert p_f > 0.6 and r_f > 0.6
    assert p_c > 0.6 and r_c < 0.2                      # collapse: realistic samples, missing modes
    assert p_n < 0.2 and p_n < p_f - 0.4                # noise: samples off the manifold
    assert density_coverage(real, collapsed)[1] < 0.2 and density_coverage(real, noisy)[0] < 0.2
    assert fid_from_features(real, fresh) < fid_from_features(real, noisy) < fid_from_features(real, collapsed)


@pytest.mark.parametrize("call", [
    lambda x: precision_recall(x, x[:3], k=3),           # k >= M
    lambda x: precision_recall(x[:3], x, k=3),           # k >= N
    lambda x: precision_recall(x, x, k=0),
    lambda x: precision_recall(x, x, k=2.5),
    lambda x: density_coverage(x[:5], x, k=5),
])
def test_k_must_be_below_n(call):
    with pytest.raises(ValueError, match="k="):
        call(np.random.default_rng(0).normal(size=(20, 3)))


def test_prdc_dimension_mismatch():
    with pytest.raises(ValueError, match="same feature dimension"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="same feature dimension"):
        density_coverage(np.zeros((10, 3)), np.zeros((10, 4)))


# ---------------------------------------------------------------- the digits classifier
def test_shipped_weights_small_and_documented():
    w = ROOT / "simple_diffusion" / "weights" / "digits_classifier.safetensors"
    info = json.loads(w.with_suffix(".json").read_text())
    assert w.stat().st_size < 1_000_000
    for key in ("config", "seed", "steps", "train_seconds", "test_accuracy", "command"):
        assert key in info


def test_classifier_accuracy_from_shipped_weights(clf, digits):
    (_, _), (xte, yte) = digits
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    with torch.no_grad():
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
    assert acc >= 0.97
    assert acc == pytest.approx(clf.info["test_accuracy"], abs=1e-9)


def test_extract_features_contract(clf, digits):
    (xtr, _), _ = digits
    f, p = extract_features(xtr[:300], clf, batch_size=7)
    assert f.shape == (300, 64) and p.shape == (300, 10) and f.dtype == p.dtype == np.float64
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-12)
    f2, p2 = extract_features(xtr[:300], clf, batch_size=300)                 # batch-independent (eval mode)
    np.testing.assert_allclose(f, f2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(p, clf(xtr[:300]).double().softmax(-1).numpy(), atol=1e-6)


def test_extract_features_refuses_training_mode_and_bad_images(clf):
    net = DigitsClassifier().train()
    with pytest.raises(ValueError, match="training mode"):
        extract_features(torch.zeros(4, 1, 8, 8), net)
    for bad, word in ((torch.zeros(4, 1, 16, 16), r"\[N, 1, 8, 8\]"), (torch.zeros(4, 8, 8), "images"),
                      (torch.zeros(4, 1, 8, 8, dtype=torch.long), "images"), (torch.full((2, 1, 8, 8), float("inf")), "finite")):
        with pytest.raises(ValueError, match=word):
            extract_features(bad, clf)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(torch.zeros(4, 1, 8, 8), clf, batch_size=0)


def test_train_save_load_round_trip(tmp_path):
    state = torch.random.get_rng_state()
    net, info = train_digits_classifier(steps=3, seed=5, width=4, feature_dim=8)
    assert torch.equal(state, torch.random.get_rng_state())                  # global RNG untouched
    assert not net.training and info["steps"] == 3 and info["config"]["width"] == 4 and 0 <= info["test_accuracy"] <= 1
    net2, _ = train_digits_classifier(steps=3, seed=5, width=4, feature_dim=8)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))   # seeded
    path = save_digits_classifier(net, info, tmp_path / "c.safetensors")
    assert path.stat().st_mode & 0o444 == 0o444                              # readable by everyone once installed
    back = load_digits_classifier(path)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(net(x), back(x)) and back.info == json.loads(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="train_digits_classifier"):
        load_digits_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="steps"):
        train_digits_classifier(steps=0)


# ---------------------------------------------------------------- end to end
def test_fid_monotone_under_noise(clf, digits):
    (xtr, _), (xte, _) = digits
    eps = torch.randn(xte.shape, generator=torch.Generator().manual_seed(0))
    ref = extract_features(xtr, clf)[0]
    fids = [fid_from_features(extract_features((xte + s * eps).clamp(-1, 1), clf)[0], ref) for s in (0, 0.1, 0.2, 0.4, 0.8)]
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


def test_evaluate_samples(clf, digits):
    (xtr, _), (xte, _) = digits
    r = evaluate_samples(xte, xtr, classifier=clf, kid_subsets=5)
    assert set(r) == {"n_samples", "n_reference", "fid", "kid", "inception_score", "precision", "recall", "density", "coverage"}
    assert r["n_samples"] == len(xte) and r["n_reference"] == len(xtr)
    assert r["fid"] > 0 and len(r["kid"]) == 2 and 1 <= r["inception_score"][0] <= 10
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["coverage"] <= 1
    assert evaluate_samples(xte * 3, xtr, classifier=clf, kid_subsets=5)["fid"] == pytest.approx(
        evaluate_samples((xte * 3).clamp(-1, 1), xtr, classifier=clf, kid_subsets=5)["fid"])       # samples are clamped
    with pytest.raises(ValueError, match="samples"):
        evaluate_samples(torch.full((3, 1, 8, 8), float("nan")), xtr, classifier=clf)
    with pytest.raises(ValueError, match="reference"):
        evaluate_samples(xte, xtr[:, 0], classifier=clf)


def test_inception_features_is_optional():
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="torchvision"):
            inception_features(torch.zeros(2, 3, 32, 32))
    else:
        pytest.skip("torchvision present: the Inception path would download weights")


@pytest.mark.slow
def test_weights_ship_in_the_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, cwd=tmp_path)
    (whl,) = tmp_path.glob("simple_diffusion-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "simple_diffusion/weights/digits_classifier.safetensors" in names
    assert "simple_diffusion/weights/digits_classifier.json" in names


def test_evaluate_samples_refuses_pixel_scale_but_keeps_clamping_overshoot(clf, digits):
    "Issue 17: 0..255 (or 0..16) pixels are refused instead of clamped to a meaningless FID; an unclipped sampler's overshoot is still clamped."
    xtr, xte = digits[0][0], digits[1][0]
    for scale in (127.5, 8.0):                                                 # 0..255 and sklearn's raw 0..16
        with pytest.raises(ValueError, match="samples must be images on the"):
            evaluate_samples((xte + 1) * scale, xtr, classifier=clf, kid_subsets=2)
    with pytest.raises(ValueError, match="reference must be real images"):
        evaluate_samples(xte, xtr * 1.5, classifier=clf, kid_subsets=2)
    over = xte.clone()
    over[:, :, 0, 0] = 12.0                                                   # overshoot, as unclipped DDIM-10 gives (up to ~15)
    assert evaluate_samples(over, xtr, classifier=clf, kid_subsets=2)["fid"] == pytest.approx(
        evaluate_samples(over.clamp(-1, 1), xtr, classifier=clf, kid_subsets=2)["fid"])
