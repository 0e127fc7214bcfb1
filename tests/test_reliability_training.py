"Tampered checkpoints and hostile CLI input: each refused with one line on stderr naming the problem, no traceback."
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from simple_diffusion.cli import main
from simple_diffusion.training import CheckpointError, TrainConfig, Trainer, load_checkpoint, load_trained, train

TINY = dict(data="moons", steps=2, batch_size=16, log_every=1, model_kwargs={"hidden": 8, "depth": 1}, device="cpu")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "run"
    train(out, progress=False, **TINY)
    return out


@pytest.fixture
def run(pristine, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    return dst


def ckpt(run):
    return run / (run / "latest").read_text()


def cli(capsys, *args):
    "main(args) → (status, stderr); stderr must be exactly one line without a traceback."
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status != 0, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "weights_only=False" not in err and "will likely succeed" not in err, err
    return err


def sample_args(run, tmp_path):
    return ["sample", "--checkpoint", run, "--out", tmp_path / "s.png", "--npy", tmp_path / "s.npy",
            "--n", 4, "--steps", 2, "--device", "cpu", "--quiet"]


def edit_json(f, **changes):
    d = json.loads(f.read_text())
    d.update(changes)
    f.write_text(json.dumps(d))


def edit_state(f, drop=(), **changes):
    st = torch.load(f, weights_only=True)
    for k in drop:
        del st[k]
    st.update(changes)
    torch.save(st, f)


@pytest.mark.parametrize("changes, word", [
    (dict(num_timesteps=1_000_000_000), "num_timesteps"),
    (dict(model_kwargs={"hidden": 1_000_000}), "model_kwargs"),
    (dict(model_kwargs={"hidden": 16, "depth": 1}), "does not fit"),     # the weights are of hidden=8
    (dict(model_kwargs={"foo": 1}), "foo"),
    (dict(batch_size=10**12), "batch_size"),
    (dict(lr="fast"), "lr"),
    (dict(data_shape=[2]), "data_shape"),                                # an unknown key
])
def test_tampered_config_is_refused(run, tmp_path, capsys, changes, word):
    edit_json(ckpt(run) / "config.json", **changes)
    err = cli(capsys, *sample_args(run, tmp_path))
    assert word in err and "config.json" in err, err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npy").exists()
    with pytest.raises(CheckpointError, match=word):
        load_trained(run)


def test_config_that_is_not_an_object(run, tmp_path, capsys):
    (ckpt(run) / "config.json").write_text("[1, 2]")
    assert "config.json" in cli(capsys, *sample_args(run, tmp_path))
    (ckpt(run) / "config.json").write_text('{"a": ' * 100 + "1" + "}" * 100)   # deeply nested, still refused
    assert "config.json" in cli(capsys, *sample_args(run, tmp_path))


@pytest.mark.parametrize("drop, changes, word", [
    (("data_shape",), {}, "data_shape"),
    ((), dict(data_shape=[10**6, 10**6, 10**6]), "data_shape"),
    ((), dict(data_shape="2"), "data_shape"),
    ((), dict(num_classes=-3), "num_classes"),
])
def test_tampered_state_is_refused_for_sampling(run, tmp_path, capsys, drop, changes, word):
    edit_state(ckpt(run) / "state.pt", drop, **changes)
    err = cli(capsys, *sample_args(run, tmp_path))
    assert word in err and "state.pt" in err, err


@pytest.mark.parametrize("drop, changes, word", [
    ((), dict(step=-100), "step"),
    ((), dict(step="3"), "step"),
    (("optimizer",), {}, "optimizer"),
    ((), dict(history=torch.zeros(50, dtype=torch.float64)), "history"),
    (("rng",), {}, "rng"),
])
def test_tampered_state_is_refused_on_resume(run, capsys, drop, changes, word):
    edit_state(ckpt(run) / "state.pt", drop, **changes)
    err = cli(capsys, "train", "--out", run, "--resume", "--steps", 4, "--quiet")
    assert word in err and "state.pt" in err, err
    assert load_checkpoint(run)["path"].name == "ckpt-00000002"               # nothing new written


@pytest.mark.parametrize("which", ["model", "ema"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(run, tmp_path, capsys, which, bad):
    f = ckpt(run) / f"{which}.safetensors"
    sd = load_file(f)
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], bad)
    save_file(sd, f)
    weights = "ema" if which == "ema" else "raw"
    err = cli(capsys, *sample_args(run, tmp_path), "--weights", weights)
    assert f"{which}.safetensors" in err and "NaN or infinite" in err and k in err, err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npy").exists()
    if which == "model":                                                  # resuming reads both
        assert "model.safetensors" in cli(capsys, "train", "--out", run, "--resume", "--steps", 4, "--quiet")


def test_truncated_weights_name_the_file(run, tmp_path, capsys):
    f = ckpt(run) / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "ema.safetensors" in err and "truncated or corrupt" in err, err


def test_unsafe_pickle_is_refused_without_the_unsafe_hint(run, tmp_path, capsys):
    torch.save({"payload": argparse.Namespace(a=1)}, ckpt(run) / "state.pt")   # needs full unpickling
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "state.pt" in err and "refused" in err, err
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(run)
    assert "weights_only" not in str(e.value)


def test_symlinked_latest_is_refused_unread(run, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("ckpt-00000002 root:x:0:0:the-secret-content")
    (run / "latest").unlink()
    os.symlink(secret, run / "latest")
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "latest" in err and "symbolic link" in err and "secret-content" not in err, err
    os.unlink(run / "latest")
    os.symlink("/etc/passwd", run / "latest")
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "root:" not in err, err


def test_latest_with_junk_is_not_echoed(run, tmp_path, capsys):
    (run / "latest").write_text("the-secret-content-of-some-file")
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "latest" in err and "secret" not in err, err


def test_ckpt_symlink_out_of_the_run_is_refused(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ckpt(run), elsewhere / "ckpt-00000009")
    os.symlink(elsewhere / "ckpt-00000009", run / "ckpt-00000009")
    (run / "latest").write_text("ckpt-00000009")
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "ckpt-00000009" in err and "symbolic link" in err, err
    (run / "latest").write_text("ckpt-00000002")                        # a file symlinked out is refused too
    f = ckpt(run) / "config.json"
    shutil.copy(f, elsewhere / "config.json")
    f.unlink()
    os.symlink(elsewhere / "config.json", f)
    err = cli(capsys, *sample_args(run, tmp_path))
    assert "config.json" in err and "symbolic link" in err, err


@pytest.mark.parametrize("args, word", [
    (["--model-kwargs", '{"foo": 1}'], "foo"),
    (["--model-kwargs", '{"hidden": 10000000}'], "model_kwargs"),
    (["--device", "meta"], "--device"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--steps", "0"], "--steps"),
    (["--num-timesteps", "1000000000"], "num_timesteps"),
    (["--seed", str(2**70)], "seed"),
])
def test_train_refusals_are_one_line(tmp_path, capsys, args, word):
    err = cli(capsys, "train", "--data", "moons", "--out", tmp_path / "r", "--quiet", *args)
    assert word in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sampling_refuses_meta_device(command, tmp_path, capsys):
    extra = ["--out", tmp_path / "x.png"] if command == "sample" else []
    assert "--device" in cli(capsys, command, "--pretrained", "digits", "--device", "meta", "--n", 4, *extra)


def test_library_refuses_meta_device():
    with pytest.raises(ValueError, match="device"):
        Trainer(TrainConfig(**{**TINY, "device": "meta"}))


@pytest.mark.slow
def test_no_traceback_in_a_real_process(run, tmp_path):
    edit_json(ckpt(run) / "config.json", num_timesteps=10**9)
    exe = [sys.executable, "-m", "simple_diffusion.cli"] if False else [str(Path(sys.executable).parent / "simple-diffusion")]
    for args in (sample_args(run, tmp_path), ["train", "--data", "moons", "--device", "meta", "--out", tmp_path / "m"]):
        r = subprocess.run([*exe, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
