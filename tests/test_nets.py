"Contracts of simple_diffusion.nets: timestep embedding, MLPDenoiser, UNet and its named configurations."
import math

import numpy as np
import pytest
import torch

from simple_diffusion.data import make_toy
from simple_diffusion.forward import q_sample
from simple_diffusion.nets import (UNET_CONFIGS, MLPDenoiser, UNet, count_parameters, make_unet,
                                   timestep_embedding)
from simple_diffusion.schedules import NoiseSchedule

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
SIZES = {"digits": 8, "mnist": 28, "cifar": 32}   # the image side each configuration is meant for


def wake(model, std=0.02, seed=0):
    "Replace the zero-initialised final layer by small random weights, so outputs and gradients are non-trivial."
    last = model.out[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(seed)) * std)
    return model


# ---------------------------------------------------------------- timestep embedding

def numpy_embedding(t, dim, max_period=10000.0):
    "Eq. (eq-nets-embedding), written independently: frequencies P^(-i/h), cosines then sines, zero pad for odd dim."
    h = dim // 2
    w = np.array([max_period ** (-i / h) for i in range(h)])
    a = np.asarray(t, dtype=np.float64)[:, None] * w[None]
    out = np.concatenate([np.cos(a), np.sin(a)], axis=1)
    return np.concatenate([out, np.zeros((len(t), dim - 2 * h))], axis=1)


@pytest.mark.parametrize("dim", [2, 3, 32, 65, 128])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.float32, torch.float64])
def test_embedding_matches_numpy(dim, dtype):
    t = (torch.arange(0, 1000, 7) if dtype in (torch.long, torch.int32) else torch.linspace(0, 999, 150)).to(dtype)
    e = timestep_embedding(t, dim)
    assert e.shape == (len(t), dim) and e.dtype == torch.float32 and e.device == t.device
    # float32 arguments omega*t with t < 1000 carry ~1000 * 2^-24 * (a few ops) ≈ 2e-4 of rounding error
    np.testing.assert_allclose(e.numpy(), numpy_embedding(t.double().numpy(), dim), atol=2e-4, rtol=0)


def test_embedding_inner_product_depends_only_on_shift():
    d, T = 64, 1000
    e = timestep_embedding(torch.arange(T), d).double()
    w = 10000.0 ** (-np.arange(d // 2) / (d // 2))
    assert torch.allclose(e.norm(dim=1), torch.full((T,), math.sqrt(d // 2), dtype=torch.float64), atol=1e-5)
    for k in (1, 3, 17, 250, 999):
        ip = (e[: T - k] * e[k:]).sum(1).numpy()
        np.testing.assert_allclose(ip, np.cos(w * k).sum(), atol=d // 2 * 4e-4)   # h terms, each off by <= 2 * 2e-4


def test_embedding_distinct_and_max_period():
    e = timestep_embedding(torch.arange(1000), 64).double()
    dist = torch.cdist(e, e) + 1e9 * torch.eye(1000)
    assert dist.min() > 0.5
    # the last frequency is P^(-(h-1)/h): check with a small P, where it is visible in a few steps
    e2 = timestep_embedding(torch.tensor([0.0, 1.0]), 4, max_period=16)   # h = 2: omegas 1 and 16^(-1/2) = 1/4
    assert torch.allclose(e2[1], torch.tensor([math.cos(1), math.cos(0.25), math.sin(1), math.sin(0.25)]), atol=1e-6)


@pytest.mark.parametrize("call, word", [
    (lambda: timestep_embedding(torch.arange(3), 1), "dim"),
    (lambda: timestep_embedding(torch.arange(3), 4.0), "dim"),
    (lambda: timestep_embedding(torch.zeros(3, 1), 4), "t must"),
    (lambda: timestep_embedding([0, 1, 2], 4), "t must"),
    (lambda: timestep_embedding(torch.arange(3), 4, max_period=1), "max_period"),
])
def test_embedding_bad_input(call, word):
    with pytest.raises(ValueError, match=word):
        call()


# ---------------------------------------------------------------- MLPDenoiser

@pytest.mark.parametrize("device", DEVICES)
def test_mlp_shapes(device):
    x, t = torch.randn(5, 3, device=device), torch.arange(5, device=device)
    m = MLPDenoiser(3).to(device)
    out = m(x, t)
    assert out.shape == (5, 3) and out.device == x.device and torch.all(out == 0)   # zero-initialised output
    assert MLPDenoiser(3, learn_sigma=True).to(device)(x, t).shape == (5, 6)
    assert MLPDenoiser(3, depth=0, hidden=8, time_dim=5)(x.cpu(), t.cpu()).shape == (5, 3)
    m = MLPDenoiser(3, num_classes=4).to(device)
    assert m(x, t, y=torch.tensor([0, 1, 2, 3, 4], device=device)).shape == (5, 3)
    assert m(x, t.float() / 3).shape == (5, 3)                     # float timesteps are accepted


def test_mlp_overfits_a_fixed_batch_of_moons():
    sched = NoiseSchedule.from_name("linear", 1000)
    x0 = make_toy("moons", 256, seed=0)
    gen = torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, 1000, (256,), generator=gen), torch.randn(256, 2, generator=gen)
    xt = q_sample(sched, x0, t, noise=eps)
    torch.manual_seed(0)
    m = MLPDenoiser(2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        loss = (m(xt, t) - eps).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(eps.square().mean().item(), abs=1e-6)   # zero output at the start
    assert losses[-1] < 0.5 * losses[0], losses[::10]                          # measured: 1.15 -> 0.15


# ---------------------------------------------------------------- UNet: shapes, dtypes, devices

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_config_shapes(name, device):
    s, c = SIZES[name], UNET_CONFIGS[name]["in_channels"]
    torch.manual_seed(0)
    for learn_sigma in (False, True):
        m = make_unet(name, learn_sigma=learn_sigma).to(device)
        x = torch.randn(2, c, s, s, device=device)
        out = m(x, torch.tensor([0, 999], device=device))
        assert out.shape == (2, c * (2 if learn_sigma else 1), s, s)
        assert out.dtype == x.dtype and out.device == x.device
        assert torch.all(out == 0)                                               # zero-initialised final conv


def test_unet_out_channels_and_learn_sigma():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert UNet(in_channels=3)(x, t).shape == (2, 3, 8, 8)
    assert UNet(in_channels=3, out_channels=1)(x, t).shape == (2, 1, 8, 8)
    assert UNet(in_channels=3, out_channels=1, learn_sigma=True)(x, t).shape == (2, 2, 8, 8)
    assert UNet(in_channels=3, learn_sigma=True, channel_mults=(1, 2))(x, t).shape == (2, 6, 8, 8)


def test_unet_non_square_and_attention_everywhere():
    m = UNet(channel_mults=(1, 2), attention_levels=(0, 1), num_res_blocks=1)
    assert wake(m)(torch.randn(2, 1, 8, 12), torch.tensor([3, 4])).shape == (2, 1, 8, 12)


def test_autocast_bf16_on_cpu():
    torch.manual_seed(0)
    m = wake(make_unet("digits", num_classes=10))
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o_bf = m(x, t, y=y)
        o32 = m(x, t, y=y)
    assert o_bf.dtype == torch.bfloat16 and torch.isfinite(o_bf).all()
    # bf16 has 8 mantissa bits (relative 4e-3 per op); a few dozen layers stay well within 5 % of the output scale
    assert (o_bf.float() - o32).abs().max() < 0.05 * o32.abs().max()
    mlp = wake(MLPDenoiser(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp(torch.randn(3, 2), torch.arange(3)).dtype == torch.bfloat16


def test_float64_model_follows_input_dtype():
    m = wake(make_unet("digits")).double()
    out = m(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1]))
    assert out.dtype == torch.float64


# ---------------------------------------------------------------- UNet: behaviour

@pytest.mark.parametrize("make, shape", [
    (lambda: make_unet("digits", num_classes=10), (8, 1, 8, 8)),
    (lambda: UNet(in_channels=3, channel_mults=(1, 2), dropout=0.0, num_classes=10), (8, 3, 8, 8)),
    (lambda: MLPDenoiser(5, num_classes=10), (8, 5)),
])
def test_batch_independence(make, shape):
    "Rows do not depend on the rest of the batch: permuting or sub-setting the batch permutes/sub-sets the output."
    torch.manual_seed(0)
    m = wake(make()).double().train()        # train mode: a BatchNorm would use batch statistics here
    x = torch.randn(shape, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (8,)), torch.randint(0, 11, (8,))
    full = m(x, t, y=y)
    perm = torch.randperm(8)
    # float64 round-off is ~1e-15; any mixing across the batch changes outputs by a fraction of their size (~0.1)
    assert torch.allclose(m(x[perm], t[perm], y=y[perm]), full[perm], atol=1e-6, rtol=0)
    assert torch.allclose(m(x[:3], t[:3], y=y[:3]), full[:3], atol=1e-6, rtol=0)
    assert torch.allclose(m(x[5:6], t[5:6], y=y[5:6]), full[5:6], atol=1e-6, rtol=0)
    assert full.abs().mean() > 1e-3                                           # the comparison is not between zeros


def test_batch_independence_check_catches_batchnorm():
    "The sub-batch comparison above fails for a network with BatchNorm (the permutation alone would not)."
    torch.manual_seed(0)
    m = wake(make_unet("digits"))
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(mod, name, torch.nn.BatchNorm2d(child.num_channels))
    m = m.double().train()
    x, t = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (8,))
    full = m(x, t)
    assert not torch.allclose(m(x[:3], t[:3]), full[:3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("make, x", [
    (lambda: make_unet("digits", num_classes=10), torch.randn(4, 1, 8, 8)),
    (lambda: MLPDenoiser(2, num_classes=10), torch.randn(4, 2)),
])
def test_class_conditioning(make, x):
    torch.manual_seed(0)
    m = wake(make())
    t = torch.tensor([5, 50, 500, 900])
    with torch.no_grad():
        o3, o7 = m(x, t, y=torch.full((4,), 3)), m(x, t, y=torch.full((4,), 7))
        o_null, o_none = m(x, t, y=torch.full((4,), 10)), m(x, t)
        o_mixed = m(x, t, y=torch.tensor([3, 10, 3, 10]))
    assert (o3 - o7).abs().amax(dim=tuple(range(1, x.ndim))).min() > 1e-4        # every example is affected
    assert (o3 - o_null).abs().amax(dim=tuple(range(1, x.ndim))).min() > 1e-4
    assert torch.equal(o_null, o_none)                                              # y=None is the null class
    assert torch.allclose(o_mixed[[0, 2]], o3[[0, 2]], atol=1e-6) and torch.allclose(o_mixed[[1, 3]], o_null[[1, 3]], atol=1e-6)


@pytest.mark.parametrize("make, x", [
    (lambda: make_unet("digits", num_classes=10, learn_sigma=True), torch.randn(4, 1, 8, 8)),
    (lambda: make_unet("mnist", base_channels=16, num_classes=10, dropout=0.1, attention_levels=(1, 2)), torch.randn(2, 1, 28, 28)),
    (lambda: make_unet("digits", scale_shift=False), torch.randn(4, 1, 8, 8)),
    (lambda: MLPDenoiser(2, num_classes=3, learn_sigma=True), torch.randn(4, 2)),
])
def test_every_parameter_gets_a_gradient(make, x):
    "No unused parameters (DistributedDataParallel requires this); at initialisation only the output layer learns."
    torch.manual_seed(0)
    m = make()
    B = len(x)
    t = torch.randint(0, 1000, (B,))
    y = None if m.num_classes is None else torch.arange(B) % (m.num_classes + 1)   # includes the null class
    (m(x, t, y=y) - 1).square().sum().backward()
    live = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert live == {"out.2.weight", "out.2.bias"}
    m.zero_grad()
    wake(m)
    (m(x, t, y=y) - 1).square().sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead


# ---------------------------------------------------------------- configurations

def test_configs_and_parameter_counts():
    counts = {name: count_parameters(make_unet(name)) for name in UNET_CONFIGS}
    assert 0.3e6 <= counts["digits"] <= 1.5e6
    # DDPM (Ho et al. 2020, Appendix B): "Our CIFAR10 model has 35.7 million parameters"
    assert round(counts["cifar"] / 1e6, 1) == 35.7
    m = make_unet("digits", num_classes=10)
    assert m.num_classes == 10 and m.label_emb.num_embeddings == 11                # one extra row: the null class
    frozen = make_unet("digits")
    frozen.conv_in.requires_grad_(False)
    n_in = sum(p.numel() for p in frozen.conv_in.parameters())
    assert count_parameters(frozen) == counts["digits"] - n_in
    assert count_parameters(frozen, trainable_only=False) == counts["digits"]
    assert count_parameters(MLPDenoiser(2, hidden=4, depth=0, time_dim=2)) == (2 * 4 + 4) + (4 * 4 + 4) + (2 * 4 + 4) + 8 + (4 * 2 + 2)


# ---------------------------------------------------------------- bad input

NET = None

def _net():
    global NET
    if NET is None: NET = make_unet("digits", num_classes=10)
    return NET

@pytest.mark.parametrize("call, word", [
    (lambda: _net()(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])), "in_channels=1"),
    (lambda: _net()(torch.randn(2, 8, 8), torch.tensor([0, 1])), "x must"),
    (lambda: _net()(torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.tensor([0, 1])), "x must"),
    (lambda: _net()(torch.randn(2, 1, 6, 8), torch.tensor([0, 1])), r"image size \(6, 8\)"),
    (lambda: make_unet("mnist", channel_mults=(1, 2, 2, 2))(torch.randn(1, 1, 28, 28), torch.tensor([0])), r"image size \(28, 28\)"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 2])), "t must.*B=2"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([[0], [1]])), "t must"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([True, False])), "t must"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([0, 11])), r"y must.*\[0, 10\]"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([-1, 0])), r"y must.*\[0, 10\]"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([0.0, 1.0])), "y must"),
    (lambda: _net()(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([0])), "y must.*B=2"),
    (lambda: make_unet("digits")(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), y=torch.tensor([0, 1])), "num_classes=None"),
    (lambda: MLPDenoiser(2)(torch.randn(2, 3), torch.tensor([0, 1])), "dim=2"),
    (lambda: MLPDenoiser(2)(torch.randn(2, 2), torch.tensor([0])), "t must"),
    (lambda: MLPDenoiser(2, num_classes=3)(torch.randn(2, 2), torch.tensor([0, 1]), y=torch.tensor([4, 0])), r"\[0, 3\]"),
    (lambda: MLPDenoiser(0), "dim"),
    (lambda: MLPDenoiser(2, depth=-1), "depth"),
    (lambda: MLPDenoiser(2, num_classes=0), "num_classes"),
    (lambda: make_unet("imagenet"), "name must be one of"),
    (lambda: UNet(base_channels=12), "num_groups=8"),
    (lambda: UNet(channel_mults=()), "channel_mults"),
    (lambda: UNet(channel_mults=(1, 0)), "channel_mults"),
    (lambda: UNet(attention_levels=(3,)), "attention_levels"),
    (lambda: UNet(base_channels=8, num_groups=4, num_heads=3), "num_heads=3"),
    (lambda: UNet(dropout=1.0), "dropout"),
    (lambda: UNet(num_res_blocks=0), "num_res_blocks"),
    (lambda: UNet(in_channels=0), "in_channels"),
    (lambda: UNet(num_classes=0), "num_classes"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, word):
    with pytest.raises(ValueError, match=word):
        call()
