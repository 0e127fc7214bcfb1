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


# ---------------------------------------------------------------- interruptions

EXE = str(Path(sys.executable).parent / "simple-diffusion")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CFG = dict(data="moons", batch_size=16, model_kwargs={"hidden": 8, "depth": 1}, device="cpu", seed=3, warmup=3)
# a lighter process than the CLI (whose imports take longer): train() with CFG, steps and intervals from argv
SCRIPT = ("import sys, json; from simple_diffusion.training import train; "
          "train(sys.argv[1], resume=sys.argv[2] == '1', progress=False, steps=int(sys.argv[3]), log_every=2, "
          "ckpt_every=2, **({} if sys.argv[2] == '1' else json.loads(sys.argv[4])))")


def start(out, steps, resume=False):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), "1" if resume else "0", str(steps), json.dumps(CFG)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_progress(proc, log, after_lines, timeout=180):
    "Block until log.jsonl has more than `after_lines` lines (training is under way) or the process ends."
    import time
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if log.is_file() and len(log.read_text().splitlines()) > after_lines:
            return True
        time.sleep(0.02)
    return False


def same_checkpoints(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["state"]["step"] == cb["state"]["step"]
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    assert torch.equal(ca["state"]["history"], cb["state"]["history"])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_checkpoints_then_stops_and_resume_is_bit_exact(tmp_path, sig, one_thread):
    import signal
    import threading
    from simple_diffusion.training import TrainingInterrupted
    tr = Trainer(TrainConfig(**CFG, steps=10**6, log_every=5, ckpt_every=10**5), tmp_path / "run")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), getattr(signal, sig)))
    timer.start()
    with pytest.raises(TrainingInterrupted) as e:
        tr.fit(progress=False)
    timer.join()
    n = e.value.step
    assert n >= 1 and e.value.checkpoint.name == f"ckpt-{n:08d}" and sig in str(e.value)
    assert signal.getsignal(getattr(signal, sig)) is not None                # the handler is restored
    resumed = train(tmp_path / "run", resume=True, progress=False, steps=n + 5)
    whole = train(tmp_path / "whole", progress=False, **CFG, steps=n + 5)
    assert resumed.step == whole.step == n + 5 and resumed.history == whole.history
    same_checkpoints(tmp_path / "run", tmp_path / "whole")


@pytest.mark.slow
def test_sigterm_through_the_cli(tmp_path):
    import signal
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", str(10**6), "--data", "moons", "--batch-size", "16", "--model-kwargs",
            '{"hidden": 8, "depth": 1}', "--device", "cpu", "--log-every", "5", "--ckpt-every", "100000", "--quiet"]
    proc = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert wait_for_progress(proc, out / "log.jsonl", 0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err and "--resume" in err and "Traceback" not in err, err
    n = load_checkpoint(out)["state"]["step"]
    assert n >= 5 and f"ckpt-{n:08d}" in err
    load_trained(out)


@pytest.mark.slow
def test_sigkill_at_random_moments_around_checkpoint_writes(tmp_path, one_thread):
    import random
    import signal
    import time
    rng, out, last = random.Random(0), tmp_path / "run", 0
    proc = start(out, 10**6)                                            # a checkpoint every 2 steps: kills land in saves
    for kill in range(5):
        lines = len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").is_file() else 0
        assert wait_for_progress(proc, out / "log.jsonl", lines), proc.communicate()[1]
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        ck = load_checkpoint(out)                                       # the previous checkpoint always loads
        load_trained(out)
        assert ck["state"]["step"] >= last
        last = ck["state"]["step"]
        if kill < 4:
            proc = start(out, 10**6, resume=True)
    final = last + 4
    resumed = train(out, resume=True, progress=False, steps=final)
    whole = train(tmp_path / "whole", progress=False, **CFG, steps=final, log_every=2, ckpt_every=2)
    assert resumed.history == whole.history
    same_checkpoints(out, tmp_path / "whole")
