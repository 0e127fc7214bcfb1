"""Contracts of simple_diffusion.data (embedded digits, toy distributions, Gaussian mixtures)."""
import math
import os
import sys

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


# ---- a user's own data: image folders, MNIST IDX files, torchvision, data specs ----------------
# (imports here, not at the top, so this block merges as one addition)
import gzip  # noqa: E402
import struct  # noqa: E402
import types  # noqa: E402

from PIL import Image  # noqa: E402

from simple_diffusion.data import (load_image_folder, load_mnist, load_torchvision,  # noqa: E402
                                   load_training_data, read_idx)


def _idx(a: np.ndarray, type_code: int = 0x08) -> bytes:
    "IDX bytes built independently of the loader: 0, 0, type, ndim, big-endian dims, data."
    return struct.pack(f">HBB{a.ndim}I", 0, type_code, a.ndim, *a.shape) + a.tobytes()


def test_image_folder_class_folders_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)           # 6 RGB images, 7 wide, 5 high
    for i, im in enumerate(a):
        d = tmp_path / ("cat" if i < 4 else "dog")
        d.mkdir(exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored: not an image")
    x, y = load_image_folder(tmp_path)
    assert x.shape == (6, 3, 5, 7) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 0, 1, 1]                           # sorted class-folder names
    torch.testing.assert_close(x, torch.from_numpy(a.transpose(0, 3, 1, 2)).float() / 127.5 - 1,
                               rtol=0, atol=1e-6)                     # PNG is lossless
    xg, _ = load_image_folder(tmp_path, grayscale=True, crop=True, size=4)
    assert xg.shape == (6, 1, 4, 4) and xg.min() >= -1 and xg.max() <= 1
    # the centre crop keeps columns 1..5 of 7 (left offset (7 - 5) // 2 = 1): no resize, exact
    xc, _ = load_image_folder(tmp_path, crop=True)
    torch.testing.assert_close(xc, x[..., :, 1:6])


def test_image_folder_flat_grey_and_jpeg(tmp_path):
    for i in range(3):
        Image.new("L", (4, 4), color=60 * i).save(tmp_path / f"{i}.png")
    Image.new("L", (4, 4), color=200).save(tmp_path / "3.JPG")
    x, y = load_image_folder(tmp_path)
    assert y is None and x.shape == (4, 1, 4, 4)
    assert x[:3, 0, 0, 0].tolist() == pytest.approx([v / 127.5 - 1 for v in (0, 60, 120)])
    assert abs(float(x[3].mean()) - (200 / 127.5 - 1)) < 0.05          # JPEG: lossy, close


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no"):
        load_image_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (6, 8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b\.png.*pass size="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=4)[0].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path, size=0)
    (tmp_path / "c.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match=r"c\.png.*not a readable image"):
        load_image_folder(tmp_path, size=4)
    (tmp_path / "c.png").unlink()
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "d.png")
    with pytest.raises(ValueError, match="both directly"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    raw = tmp_path / "raw"                                            # torchvision's layout
    raw.mkdir()
    suffix = ".gz" if compress else ""
    pack = gzip.compress if compress else (lambda b: b)
    (raw / f"train-images-idx3-ubyte{suffix}").write_bytes(pack(_idx(imgs)))
    (raw / f"train-labels-idx1-ubyte{suffix}").write_bytes(pack(_idx(labels)))
    x, y = load_mnist(tmp_path)
    assert x.shape == (7, 1, 28, 28) and y.dtype == torch.long
    assert torch.equal(y, torch.from_numpy(labels).long())
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1, rtol=0, atol=1e-6)
    xp, _ = load_mnist(tmp_path, pad=2)
    assert xp.shape == (7, 1, 32, 32) and (xp[..., :2, :] == -1).all()
    assert load_mnist(tmp_path, size=16)[0].shape == (7, 1, 16, 16)
    # the same files through the data spec the CLI uses
    xs, ys = load_training_data(f"mnist:{tmp_path}?pad=2")
    assert torch.equal(xs, xp) and torch.equal(ys, y)
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "val")


def test_read_idx_types_and_refusals(tmp_path):
    p = tmp_path / "f.idx"
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    p.write_bytes(_idx(a, 0x0C))
    assert np.array_equal(read_idx(p), a)
    good = _idx(np.arange(20, dtype=np.uint8))
    cases = {
        "not an IDX file": b"\x01\x00\x08\x01" + good[4:],           # first bytes must be zero
        "not an IDX file ": b"\x00\x00\x07\x01" + good[4:],          # unknown type code
        "truncated IDX header": good[:6],
        "truncated or corrupt": good[:-1],
        "the file has": good + b"\x00",                              # trailing data, raw file
        "announces": b"\x00\x00\x08\x03" + struct.pack(">3I", 60000, 60000, 60000),
    }
    for msg, data in cases.items():
        p.write_bytes(data)
        with pytest.raises(ValueError, match=msg.strip()) as e:
            read_idx(p)
        assert "f.idx" in str(e.value)                               # the message names the file
    for msg, data in {"truncated": good[:-1], "trailing": good + b"\x00"}.items():
        p.write_bytes(gzip.compress(data))
        with pytest.raises(ValueError, match=msg):
            read_idx(p)
    p.write_bytes(gzip.compress(good)[:-6])                          # a cut gzip stream
    with pytest.raises(ValueError, match="f.idx"):
        read_idx(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_idx(tmp_path / "none")


def test_mnist_refuses_wrong_contents(tmp_path):
    imgs = np.zeros((3, 4, 4), np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(imgs))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match="expected 3 uint8 labels"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((3, 16), np.uint8)))
    with pytest.raises(ValueError, match=r"images \[N, H, W\]"):
        load_mnist(tmp_path)


def test_torchvision_with_and_without(monkeypatch, tmp_path):
    try:
        import torchvision  # noqa: F401
        have = True
    except Exception:
        have = False
    if not have:
        with pytest.raises(ImportError, match="needs torchvision"):
            load_torchvision("MNIST", tmp_path)
        with pytest.raises(ValueError, match="needs torchvision"):     # one line in the CLI
            load_training_data("torchvision:MNIST")
    # a stand-in torchvision.datasets with the attributes the loader reads (data, targets)
    class FakeCIFAR:
        def __init__(self, root, train, download):
            n = 5 if train else 2
            self.data = np.full((n, 4, 4, 3), 255, np.uint8)
            self.targets = list(range(n))
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(FakeCIFAR=FakeCIFAR)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    x, y = load_training_data(f"torchvision:FakeCIFAR?root={tmp_path}&split=test")
    assert x.shape == (2, 3, 4, 4) and (x == 1).all() and y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="torchvision.datasets class"):
        load_torchvision("NoSuchSet", tmp_path)


def test_data_spec_refusals(tmp_path):
    for spec, word in [("folder:", "needs a path"), (f"folder:{tmp_path}?size=big", "integer"),
                       (f"folder:{tmp_path}?crop=maybe", "crop"), (f"mnist:{tmp_path}?crop", "crop"),
                       ("imagenet", "KIND:PATH"), (f"folder:{tmp_path}", "holds no")]:
        with pytest.raises(ValueError, match=word):
            load_training_data(spec)


@pytest.mark.slow
def test_cli_trains_on_an_image_folder(tmp_path):
    import subprocess
    import shutil
    from pathlib import Path
    exe = shutil.which("simple-diffusion", path=str(Path(sys.executable).parent))
    assert exe, "the console script is not installed: pip install -e . --no-deps"
    imgs = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for k in ("a", "b"):
        (imgs / k).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(imgs / k / f"{i}.png")
    out = tmp_path / "run"
    r = subprocess.run([exe, "train", "--data", f"folder:{imgs}?size=8", "--out", str(out), "--steps", "2",
                        "--batch-size", "4", "--device", "cpu", "--quiet", "--class-conditional",
                        "--model-kwargs", '{"base_channels": 8}'],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "trained 2 steps" in r.stdout
    from simple_diffusion.training import load_trained
    model, cfg = load_trained(out)
    assert cfg.data == f"folder:{imgs}?size=8" and cfg.class_conditional
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 5]), y=torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    # a bad folder is one line on stderr, naming the file, exit status 1
    (imgs / "a" / "bad.png").write_bytes(b"nope")
    r = subprocess.run([exe, "train", "--data", f"folder:{imgs}?size=8", "--out", str(tmp_path / "r2"),
                        "--steps", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "bad.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_data_spec_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "pics" / "a.png")
    x, y = load_training_data("folder:~/pics")
    assert x.shape == (1, 1, 4, 4) and y is None
