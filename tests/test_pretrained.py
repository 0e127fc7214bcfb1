"""The shipped weights: listed, loadable, finite samples, small, safe formats; and the documented train command still works."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from simple_diffusion.pretrained import available, card, export_pretrained, load, weights_dir
from simple_diffusion.sampling import sample
from simple_diffusion.schedules import NoiseSchedule
from simple_diffusion.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


SHIPPED = ("digits", "digits_cond", "gmm8")


def test_listed_and_loadable():
    assert set(SHIPPED) <= set(available())
    assert "digits_classifier" not in available()                                     # another kind of file in the same folder
    for name in SHIPPED:
        model, sched, cfg = load(name)
        info = card(name)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert isinstance(sched, NoiseSchedule) and sched.num_timesteps == cfg.num_timesteps == 1000
        assert isinstance(cfg, TrainConfig)
        # the card's fields load as recorded; the only field it lacks is one added after the runs
        # (ema_warmup), which takes its default
        loaded = cfg.to_dict()
        assert {k: loaded[k] for k in info["train_config"]} == info["train_config"]
        assert set(loaded) - set(info["train_config"]) <= {"ema_warmup"}
        assert info["command"].split()[1:3] == ["simple-diffusion", "train"] and info["train_seconds"] > 0 and info["steps"] == cfg.steps
    assert card("digits_cond")["num_classes"] == 10 and card("digits")["num_classes"] is None


def test_shipped_weights_give_finite_samples():
    g = lambda: torch.Generator().manual_seed(0)
    digits, sched, cfg = load("digits")
    # unclipped ε-model digits stay in range with leading spacing (the log-SNR default starts at
    # σ/α = 80 and leaves ~8 % of unclipped pixels beyond ±1.5 at 10 steps: see the session note)
    x = sample(digits, sched, (8, 1, 8, 8), "ddim", 10, spacing="leading", prediction=cfg.prediction, generator=g())
    assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() < 5
    cond, sched, _ = load("digits_cond")
    x = sample(cond, sched, (10, 1, 8, 8), "dpmpp2m", 10, model_kwargs={"y": torch.arange(10)}, clip_denoised=True, generator=g())
    assert torch.isfinite(x).all() and x.abs().max() <= 1
    toy, sched, _ = load("gmm8")
    x = sample(toy, sched, (500, 2), "ddpm", 50, generator=g())
    r = x.norm(dim=1)                                                                    # the ring has radius 2, components σ = 0.1
    assert torch.isfinite(x).all() and ((r - 2).abs() < 0.5).float().mean() > 0.95


def test_files_small_and_safe():
    files = [f for f in weights_dir().iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 10e6
    assert {f.suffix for f in files} <= {".safetensors", ".json"}                        # no pickles
    for name in SHIPPED: assert (weights_dir() / f"{name}.safetensors").stat().st_mode & 0o044 == 0o044   # readable by all


def test_bad_input():
    with pytest.raises(ValueError, match="name must be one of"): load("cifar")
    with pytest.raises(ValueError, match="name must be one of"): card("nope")


@pytest.mark.slow
def test_documented_command_trains(tmp_path):
    "The exact command on the gmm8 card, with --steps 5 and another --out, trains; its run exports and loads back."
    args = shlex.split(card("gmm8")["command"])
    assert args[0] == "OMP_NUM_THREADS=1" and args[1] == "simple-diffusion"
    args = args[2:]
    args[args.index("--out") + 1] = str(tmp_path / "run")
    args[args.index("--steps") + 1] = "5"
    exe = shutil.which("simple-diffusion", path=os.path.dirname(sys.executable)) or shutil.which("simple-diffusion")
    cli = [exe] if exe else [sys.executable, "-c", "import sys; from simple_diffusion.cli import main; sys.exit(main())"]
    r = subprocess.run(cli + args + ["--quiet"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    export_pretrained(tmp_path / "run", "mine", command="test", train_seconds=1.0, directory=tmp_path / "w")
    assert available(tmp_path / "w") == ["mine"]
    model, sched, cfg = load("mine", directory=tmp_path / "w")
    # today's run records ema_warmup (its default, True), which the older card lacks
    assert cfg.to_dict() == {**card("gmm8")["train_config"], "steps": 5, "ema_warmup": True}
    assert json.loads((tmp_path / "w" / "mine.json").read_text())["steps"] == 5
    assert torch.isfinite(sample(model, sched, (16, 2), "ddim", 5)).all()


def test_cli_sample(tmp_path, capsys):
    from simple_diffusion.cli import main
    assert main(["sample", "--pretrained", "digits", "--steps", "5", "--n", "4", "--out", str(tmp_path / "d.png"), "--npy", str(tmp_path / "d.npy"), "--quiet"]) == 0
    import numpy as np
    a = np.load(tmp_path / "d.npy")
    assert a.shape == (4, 1, 8, 8) and np.isfinite(a).all() and (tmp_path / "d.png").stat().st_size > 0
    assert main(["sample", "--pretrained", "gmm8", "--sampler", "dpmpp2m", "--steps", "5", "--n", "50", "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert main(["sample", "--pretrained", "digits_cond", "--label", "7", "--steps", "3", "--n", "2", "--out", str(tmp_path / "c.png"), "--quiet"]) == 0
    capsys.readouterr()
    for args, msg in ((["--pretrained", "digits", "--steps", "0"], "steps must be"), (["--pretrained", "digits", "--sampler", "ddpm", "--eta", "0.5"], "eta applies"),
                      (["--pretrained", "digits", "--label", "1"], "--class needs"), (["--pretrained", "nope"], "name must be one of"),
                      (["--pretrained", "digits_cond", "--label", "11"], "--class must be a label in [0, 9]")):
        assert main(["sample", *args, "--out", str(tmp_path / "x.png"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert main(["sample", "--pretrained", "digits", "--out", str(tmp_path / "x.jpg")]) == 1


# --- integrity of the shipped weights (issue 17, item 2) -------------------------------------------

import hashlib

from safetensors.torch import load_file, save_file

from simple_diffusion.pretrained import sha256_file, verify_sha256
from simple_diffusion.training import CheckpointError


def _copy(tmp_path, name="gmm8"):
    for suffix in (".json", ".safetensors"):
        shutil.copy(weights_dir() / f"{name}{suffix}", tmp_path)
    return tmp_path / f"{name}.json", tmp_path / f"{name}.safetensors"


def _edit_card(card_file, **changes):
    info = json.loads(card_file.read_text())
    for k, v in changes.items():
        if k in TrainConfig.__dataclass_fields__:
            info["train_config"][k] = v
        else:
            info[k] = v
    card_file.write_text(json.dumps(info))


def _refused(name, directory, fragment):
    with pytest.raises(CheckpointError) as e:
        load(name, directory=directory)
    msg = str(e.value)
    assert fragment in msg and len(msg.splitlines()) == 1, msg
    return msg


def test_every_card_carries_the_sha256_of_its_weights():
    for f in weights_dir().glob("*.json"):
        want = hashlib.sha256(f.with_suffix(".safetensors").read_bytes()).hexdigest()   # independent: one read, no chunks
        assert json.loads(f.read_text())["sha256"] == want == sha256_file(f.with_suffix(".safetensors"), chunk_size=7), f


def test_perturbed_byte_refused(tmp_path):
    card_file, w = _copy(tmp_path)
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0x10                                                           # one bit of one weight
    w.write_bytes(bytes(raw))
    msg = _refused("gmm8", tmp_path, "SHA-256")
    assert str(w) in msg


def test_wrong_or_missing_hash_refused(tmp_path):
    card_file, w = _copy(tmp_path)
    _edit_card(card_file, sha256="0" * 64)
    _refused("gmm8", tmp_path, "SHA-256")
    _edit_card(card_file, sha256="not-a-hash")
    _refused("gmm8", tmp_path, "sha256 must be")
    info = json.loads(card_file.read_text())
    del info["sha256"]
    card_file.write_text(json.dumps(info))
    _refused("gmm8", tmp_path, "sha256 must be")
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_sha256(w, "f" * 64, card_file)


def test_truncated_safetensors_refused(tmp_path):
    card_file, w = _copy(tmp_path)
    w.write_bytes(w.read_bytes()[:100])                                                  # header cut
    _edit_card(card_file, sha256=sha256_file(w))                                         # so that the hash passes and the reader is reached
    msg = _refused("gmm8", tmp_path, "truncated or corrupt safetensors")
    assert str(w) in msg and "SafetensorError" in msg


def test_nan_weights_with_matching_hash_refused(tmp_path):
    card_file, w = _copy(tmp_path)
    with __import__("safetensors").safe_open(str(w), "pt") as f:
        meta = f.metadata()
    sd = load_file(w)
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, w, metadata=meta)
    _edit_card(card_file, sha256=sha256_file(w))
    msg = _refused("gmm8", tmp_path, "NaN or Inf")
    assert k in msg and str(w) in msg


def test_card_fields_checked_against_the_weights(tmp_path):
    card_file, _ = _copy(tmp_path)
    original = card_file.read_text()
    for changes, fragment in (({"num_timesteps": 10}, "train_config in num_timesteps differs"),
                              ({"prediction": "v"}, "train_config in prediction differs"),
                              ({"model_kwargs": {"hidden": 1_000_000}}, "model_kwargs differs"),
                              ({"data_shape": [3]}, "data_shape differs"),
                              ({"num_classes": 10}, "num_classes differs"),
                              ({"data_shape": [2, 10**9]}, "data_shape must be"),
                              ({"data_shape": "2"}, "data_shape must be"),
                              ({"num_classes": -1}, "num_classes must be"),
                              ({"num_timesteps": "1000"}, "not a valid train_config"),
                              ({"train_config": []}, "train_config must be")):
        card_file.write_text(original)
        _edit_card(card_file, **changes)
        assert str(card_file) in _refused("gmm8", tmp_path, fragment)
    card_file.write_text(original)
    assert load("gmm8", directory=tmp_path)[2].num_timesteps == 1000                     # the untouched copy still loads


def test_card_checked_against_shapes_without_recorded_fields(tmp_path):
    "Weights with no recorded card (an older export): the tensors' shapes still catch another data shape or width, before allocating."
    card_file, w = _copy(tmp_path)
    save_file(load_file(w), w)                                                           # header metadata dropped
    _edit_card(card_file, sha256=sha256_file(w))
    original = card_file.read_text()
    assert load("gmm8", directory=tmp_path)[0] is not None
    for changes, fragment in (({"data_shape": [3]}, "does not fit gmm8.safetensors"),
                              ({"model_kwargs": {"hidden": 64}}, "does not fit gmm8.safetensors"),
                              ({"model_kwargs": {"hidden": 1_000_000}}, "more than")):   # refused on the meta device: nothing allocated
        card_file.write_text(original)
        _edit_card(card_file, **changes)
        _refused("gmm8", tmp_path, fragment)


def test_digits_classifier_integrity(tmp_path):
    from simple_diffusion.metrics import load_digits_classifier
    for suffix in (".json", ".safetensors"):
        shutil.copy(weights_dir() / f"digits_classifier{suffix}", tmp_path)
    w = tmp_path / "digits_classifier.safetensors"
    assert json.loads(w.with_suffix(".json").read_text())["sha256"] == sha256_file(w)
    assert load_digits_classifier(w).info["test_accuracy"] == 1.0
    good = w.read_bytes()
    w.write_bytes(good[:-8])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_digits_classifier(w)
    info = json.loads(w.with_suffix(".json").read_text())
    del info["sha256"]                                                                   # a card without a hash: the reader still names the file
    w.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError) as e:
        load_digits_classifier(w)
    assert "truncated or corrupt safetensors" in str(e.value) and str(w) in str(e.value)
    sd = load_file(weights_dir() / "digits_classifier.safetensors")
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k] * float("inf")
    save_file(sd, w)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_digits_classifier(w)
