"""Contracts of simple_diffusion.discrete: text encoding, the corpus, the absorbing/uniform chains, the masked
bound against enumeration on a tiny known distribution, the transformer, the unmasking sampler, the n-gram."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simple_diffusion.discrete import (ALPHABET, MASK_ID, MASK_SCHEDULES, OBJECTIVES, TRANSITIONS, VOCAB, BPC,
                                       CharNGram, TextTransformer, autoregressive_nll, bits_per_char, decode,
                                       docstring_corpus, encode, mask_schedule, mask_tokens, masked_elbo,
                                       masked_elbo_time, normalize_text, random_windows, sample_unmask,
                                       split_sequences, train_text_model, transition_matrix)

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

TRAIN = docstring_corpus("train")


def test_text_round_trip_and_bad_input():
    s = normalize_text("Hello, World!  2 + 2 == Four\n")
    assert s == "hello world four" and decode(encode(s)) == s
    assert len(ALPHABET) == VOCAB == 27 and MASK_ID == 27
    assert decode(torch.tensor([[0, 27], [25, 26]])) == ["a_", "z "]
    for bad, name in ((lambda: normalize_text(3), "text"), (lambda: encode("A"), "text"),
                      (lambda: encode("é"), "text"), (lambda: decode(torch.tensor([28])), "tokens"),
                      (lambda: decode(torch.tensor([0.5])), "tokens"), (lambda: decode([1, 2]), "tokens"),
                      (lambda: decode(torch.zeros(1, 1, 1, dtype=torch.long)), "tokens")):
        with pytest.raises(ValueError, match=name):
            bad()


def test_corpus_split():
    held = docstring_corpus("heldout")
    assert 0.85 < len(TRAIN) / (len(TRAIN) + len(held)) < 0.95 and len(held) > 10_000
    assert TRAIN.dtype == torch.long and int(TRAIN.max()) < VOCAB and int(held.min()) >= 0
    a, b = docstring_corpus("train", block=100, every=2), docstring_corpus("heldout", block=100, every=2)
    assert abs(len(a) - len(b)) <= 100
    for kw, name in (({"split": "test"}, "split"), ({"block": 0}, "block"), ({"every": 1}, "every")):
        with pytest.raises(ValueError, match=name):
            docstring_corpus(**kw)


def test_windows_and_rows():
    assert split_sequences(TRAIN[:100], 32).shape == (3, 32)
    w = random_windows(TRAIN, 16, 7, torch.Generator().manual_seed(0))
    assert w.shape == (7, 16)
    for bad, name in ((lambda: split_sequences(TRAIN, 0), "length"), (lambda: split_sequences(TRAIN[None], 4), "tokens"),
                      (lambda: random_windows(TRAIN[:10], 11, 2), "length"), (lambda: random_windows(TRAIN, 4, 0), "batch_size")):
        with pytest.raises(ValueError, match=name):
            bad()


@pytest.mark.parametrize("kind", TRANSITIONS)
def test_transition_closed_form_vs_product_and_chain(kind):
    gen = torch.Generator().manual_seed(1)
    betas = torch.rand(15, generator=gen, dtype=torch.float64) * 0.3
    Qs = [transition_matrix(float(b), kind, vocab=5) for b in betas]
    ab = float(torch.prod(1 - betas))
    closed = transition_matrix(1 - ab, kind, vocab=5)
    assert torch.allclose(torch.linalg.multi_dot(Qs), closed, rtol=0, atol=1e-12)
    assert torch.allclose(closed.sum(1), torch.ones(len(closed), dtype=torch.float64), atol=1e-14)
    # the chain itself, sampled: final-state frequencies within 5 binomial standard errors of x0 Q̄
    n, x = 40_000, torch.full((40_000,), 2)
    for Q in Qs:
        x = torch.multinomial(Q[x], 1, generator=gen).squeeze(1)
    f = torch.bincount(x, minlength=len(closed)).double() / n
    p = closed[2]
    assert ((f - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


def test_transition_bad_input():
    for kw, name in (({"beta": -0.1}, "beta"), ({"beta": 0.1, "kind": "gauss"}, "kind"),
                     ({"beta": 0.1, "vocab": 0}, "vocab"), ({"beta": float("nan")}, "beta")):
        with pytest.raises(ValueError, match=name):
            transition_matrix(**kw)
    absorbing = transition_matrix(0.4, "absorbing", vocab=3)
    assert absorbing.shape == (4, 4) and absorbing[3, 3] == 1 and absorbing[0, 3] == pytest.approx(0.4)


@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
def test_mask_schedule(schedule):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    a, da = mask_schedule(t, schedule)
    fd = (mask_schedule(t + 1e-6, schedule)[0] - mask_schedule(t - 1e-6, schedule)[0]) / 2e-6
    assert torch.allclose(da, fd, rtol=1e-6, atol=1e-8) and bool((da < 0).all())
    assert float(mask_schedule(0.0, schedule)[0]) == 1 and abs(float(mask_schedule(1.0, schedule)[0])) < 1e-15
    for bad, name in ((lambda: mask_schedule(1.5, schedule), "t"), (lambda: mask_schedule(0.5, "exp"), "schedule"),
                      (lambda: mask_schedule(torch.tensor([-0.1]), schedule), "t")):
        with pytest.raises(ValueError, match=name):
            bad()


def test_mask_tokens():
    x0 = TRAIN[:20_000].reshape(200, 100)
    gen = torch.Generator().manual_seed(2)
    keep = torch.linspace(0, 1, 200, dtype=torch.float64)
    xt = mask_tokens(x0, keep, gen)
    visible = xt != MASK_ID
    assert torch.equal(xt[visible], x0[visible])
    assert bool((xt[0] == MASK_ID).all()) and torch.equal(xt[-1], x0[-1])
    frac = float((mask_tokens(x0, 0.3, gen) != MASK_ID).double().mean())
    assert abs(frac - 0.3) < 5 * math.sqrt(0.21 / x0.numel())
    for bad, name in ((lambda: mask_tokens(x0, 1.1), "keep"), (lambda: mask_tokens(x0, torch.ones(3)), "keep"),
                      (lambda: mask_tokens(x0.float(), 0.5), "x0"), (lambda: mask_tokens(x0[0], 0.5), "x0"),
                      (lambda: mask_tokens(torch.full((2, 3), MASK_ID), 0.5), "x0")):
        with pytest.raises(ValueError, match=name):
            bad()


# ---- a tiny distribution known exactly: K = 3 letters, L = 3 -----------------------------------------------
K3, L3 = 3, 3
SEQS = torch.tensor(list(itertools.product(range(K3), repeat=L3)))
P = torch.as_tensor(np.random.default_rng(0).dirichlet(np.full(len(SEQS), 0.7)))
STATES = torch.tensor(list(itertools.product(list(range(K3)) + [MASK_ID], repeat=L3)))
MASKS = [torch.tensor(m, dtype=torch.bool) for m in itertools.product([0, 1], repeat=L3) if any(m)]


def code(x):
    return (x.clamp(max=K3) * torch.tensor([(K3 + 1) ** 2, K3 + 1, 1])).sum(-1)


def exact_table():
    tab = torch.zeros(len(STATES), L3, K3, dtype=torch.float64)
    for s in STATES:
        w = P * ((SEQS == s) | (s == MASK_ID)).all(1)
        for l, c in itertools.product(range(L3), range(K3)):
            tab[code(s), l, c] = w[SEQS[:, l] == c].sum() / w.sum()
    return tab


EXACT = exact_table()
WRONG = 0.6 * EXACT + 0.4 * torch.softmax(torch.randn(EXACT.shape, generator=torch.Generator().manual_seed(3),
                                                      dtype=torch.float64), -1)


class Table(nn.Module):
    def __init__(self, tab):
        super().__init__()
        self.tab = tab

    def forward(self, xt):
        return F.pad(self.tab[code(xt)].log(), (0, VOCAB - K3), value=-math.inf).float()


def C(tab, M):
    "Σ_{l∈M} -log x_θ^l(x0 masked on M)[x0^l] for every sequence."
    xt = torch.where(M, torch.full_like(SEQS, MASK_ID), SEQS)
    return -(tab[code(xt)].gather(-1, SEQS[..., None]).squeeze(-1).log() * M).sum(1)


def bound_inf(tab):
    "The continuous-time bound of every sequence by enumerating mask patterns (count form)."
    return sum(C(tab, M) / (int(M.sum()) * math.comb(L3, int(M.sum()))) for M in MASKS)


def model_nll(tab):
    "-log of the one-token-at-a-time sampler's probability, averaged over the L! orders."
    like = torch.zeros(len(SEQS), dtype=torch.float64)
    for order in itertools.permutations(range(L3)):
        xt, p = torch.full_like(SEQS, MASK_ID), torch.ones(len(SEQS), dtype=torch.float64)
        for l in order:
            p = p * tab[code(xt)][torch.arange(len(SEQS)), l, SEQS[:, l]]
            xt[:, l] = SEQS[:, l]
        like += p / math.factorial(L3)
    return -like.log()


def test_bound_is_tight_for_the_exact_denoiser_and_an_upper_bound_otherwise():
    H = float(-(P * P.log()).sum())
    assert torch.allclose(bound_inf(EXACT), -P.log(), rtol=0, atol=1e-12)
    b, nll = bound_inf(WRONG), model_nll(WRONG)
    assert bool((b >= nll - 1e-12).all()) and float((P * b).sum()) > float((P * nll).sum()) > H + 1e-3


def test_masked_elbo_unbiased():
    n, gen = 40_000, torch.Generator().manual_seed(4)
    idx = torch.multinomial(P, n, replacement=True, generator=gen)
    est = masked_elbo(Table(WRONG), SEQS[idx], gen).double()
    exact = float((P * bound_inf(WRONG)).sum())
    assert abs(float(est.mean()) - exact) < 5 * float(est.std()) / math.sqrt(n)


@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
def test_masked_elbo_time_at_fixed_t(schedule):
    n, gen = 40_000, torch.Generator().manual_seed(5)
    idx = torch.multinomial(P, n, replacement=True, generator=gen)
    for t in (0.15, 0.6, 1.0):
        keep, dkeep = (float(v) for v in mask_schedule(t, schedule))
        inner = sum((1 - keep) ** int(M.sum()) * keep ** int((~M).sum()) * C(WRONG, M) for M in MASKS)
        exact = -dkeep / (1 - keep) * float((P * inner).sum())
        est = masked_elbo_time(Table(WRONG), SEQS[idx], t, schedule, gen).double()
        assert abs(float(est.mean()) - exact) < 5 * float(est.std()) / math.sqrt(n) + 1e-9, t


def test_elbo_bad_input():
    m, x = Table(EXACT), SEQS[:4]
    for bad, name in ((lambda: masked_elbo_time(m, x, 0.0), "t"), (lambda: masked_elbo_time(m, x, torch.rand(3)), "t"),
                      (lambda: masked_elbo_time(m, x, 0.5, "cos"), "schedule"), (lambda: masked_elbo(m, x.float()), "x0"),
                      (lambda: masked_elbo(lambda z: torch.zeros(4, 3, 5), x), "model")):
        with pytest.raises(ValueError, match=name):
            bad()


def test_transformer_shapes_causality_and_normalisation():
    torch.manual_seed(0)
    net, ar = TextTransformer(length=6, width=16, depth=1, heads=2), TextTransformer(length=2, width=16, depth=1, heads=2, causal=True)
    x = torch.randint(0, VOCAB, (3, 6))
    assert net(x).shape == (3, 6, VOCAB) and net(x[:, :4]).shape == (3, 4, VOCAB)
    assert sum(p.numel() for p in TextTransformer(causal=True).parameters()) == sum(p.numel() for p in TextTransformer().parameters())
    # the AR model is a normalised distribution: over all 27² sequences of length 2, probabilities sum to 1
    allseq = torch.tensor(list(itertools.product(range(VOCAB), repeat=2)))
    with torch.no_grad():
        assert abs(float(torch.exp(-autoregressive_nll(ar, allseq).double()).sum()) - 1) < 1e-4
        manual = -torch.log_softmax(ar(torch.tensor([[MASK_ID, 4]])), -1)[0, [0, 1], [4, 7]].sum()
        assert torch.allclose(autoregressive_nll(ar, torch.tensor([[4, 7]])), manual[None], atol=1e-5)
    for bad, name in ((lambda: TextTransformer(width=10, heads=4), "heads"), (lambda: TextTransformer(depth=0), "depth"),
                      (lambda: net(torch.zeros(1, 7, dtype=torch.long)), "length"), (lambda: net(torch.zeros(1, 2)), "x"),
                      (lambda: autoregressive_nll(ar, torch.zeros(2, dtype=torch.long)), "x0")):
        with pytest.raises(ValueError, match=name):
            bad()


def test_sampler_valid_tokens_and_distribution():
    torch.manual_seed(1)
    net = TextTransformer(length=12, width=16, depth=1, heads=2).eval()
    for S in (1, 3, 40):
        x, path = sample_unmask(net, 5, 12, S, generator=torch.Generator().manual_seed(6), return_path=True)
        assert x.shape == (5, 12) and x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < VOCAB
        assert len(path) == S and all(bool(((a == MASK_ID) | (a == b)).all()) for a, b in zip(path, path[1:]))
    pi = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)), 0).double()
    const = lambda z: pi.log().float().expand(*z.shape, VOCAB)
    xs = sample_unmask(const, 500, 40, 5, "cosine", generator=torch.Generator().manual_seed(8))
    f = torch.bincount(xs.flatten(), minlength=VOCAB).double() / xs.numel()
    assert ((f - pi).abs() <= 5 * (pi * (1 - pi) / xs.numel()).sqrt()).all()
    for kw, name in (({"num": 0}, "num"), ({"length": 0}, "length"), ({"steps": 0}, "steps"), ({"schedule": "x"}, "schedule")):
        args = {"num": 2, "length": 4, "steps": 2, **kw}
        with pytest.raises(ValueError, match=name):
            sample_unmask(const, **args)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_ngram_normalised(order):
    lm = CharNGram(order).fit(TRAIN)
    ctx = [torch.zeros(50, 0, dtype=torch.long), random_windows(TRAIN, 3, 50, torch.Generator().manual_seed(9)),
           torch.randint(0, VOCAB, (50, 6), generator=torch.Generator().manual_seed(10))]
    for c in ctx:
        p = lm.next_probs(c)
        assert p.shape == (50, VOCAB) and bool((p > 0).all()) and torch.allclose(p.sum(1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    allseq = torch.tensor(list(itertools.product(range(VOCAB), repeat=2)))
    assert abs(float(lm.log_prob(allseq).exp().sum()) - 1) < 1e-10


def test_ngram_counts_and_bad_input():
    x = encode("abab")
    lm = CharNGram(2).fit(x)
    # after "a": N = 2, one distinct continuation (b); p(b|a) = (2 + 1·p1(b)) / 3 with p1(b) = (2 + 1/27)/(4 + 2)
    p1b = (2 + 2 / 27) / (4 + 2)
    assert lm.next_probs(encode("a")[None])[0, 1].item() == pytest.approx((2 + p1b) / 3, rel=1e-12)
    for bad, name in ((lambda: CharNGram(0), "order"), (lambda: CharNGram(2).log_prob(x[None]), "fit"),
                      (lambda: lm.fit(x[None]), "tokens"), (lambda: lm.next_probs(x), "context"),
                      (lambda: lm.log_prob(x), "x0")):
        with pytest.raises(ValueError, match=name):
            bad()


def test_bits_per_char_and_training():
    x = split_sequences(TRAIN[:640], 32)
    r = bits_per_char(lambda z: torch.full((len(z),), 32 * math.log(2.0)), x, batch_size=7)
    assert isinstance(r, BPC) and r.mean == pytest.approx(1.0) and r.stderr == pytest.approx(0.0, abs=1e-12)
    assert r.per_sequence.shape == (20,)
    torch.manual_seed(2)
    for objective in OBJECTIVES:
        net = TextTransformer(length=16, width=16, depth=1, heads=2, causal=objective == "autoregressive")
        losses = train_text_model(net, TRAIN, objective, steps=30, batch_size=8, generator=torch.Generator().manual_seed(11))
        assert len(losses) == 30 and all(math.isfinite(v) for v in losses) and not net.training
        assert np.mean(losses[-10:]) < np.mean(losses[:5])
    for bad, name in ((lambda: bits_per_char(lambda z: z, x[:1]), "x0"), (lambda: bits_per_char(lambda z: z, x, repeats=0), "repeats"),
                      (lambda: train_text_model(net, TRAIN, "score"), "objective"), (lambda: train_text_model(net, TRAIN, steps=0), "steps"),
                      (lambda: train_text_model(net, TRAIN, lr=0.0), "lr")):
        with pytest.raises(ValueError, match=name):
            bad()
