"The `simple-diffusion` console script: end to end on digits, resume, and one-line errors for bad input."
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simple_diffusion.cli import build_parser, main
from simple_diffusion.training import TrainConfig, load_checkpoint, load_trained

EXE = shutil.which("simple-diffusion", path=str(Path(sys.executable).parent)) or shutil.which("simple-diffusion")


def run(*args, timeout=180):
    assert EXE, "the console script is not installed: pip install -e . --no-deps"
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_digits_end_to_end(tmp_path):
    out = tmp_path / "digits"
    r = run("train", "--data", "digits", "--steps", 5, "--out", out, "--seed", 0, "--batch-size", 16, "--device", "cpu",
            "--log-every", 2, "--class-conditional", "--model-kwargs", '{"base_channels": 8}')
    assert r.returncode == 0, r.stderr
    assert "trained 5 steps" in r.stdout
    ck = load_checkpoint(out)
    assert ck["state"]["step"] == 5 and ck["config"]["class_conditional"] and ck["config"]["data"] == "digits"
    model, cfg = load_trained(out)
    y = torch.tensor([3, 10])                                             # a digit label and the null class
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]), y=y).shape == (2, 1, 8, 8)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 5] and all(r["images_per_s"] > 0 for r in log)
    # resuming continues the run; a changed learning rate is refused with one line
    r = run("train", "--out", out, "--resume", "--steps", 7, "--quiet")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out)["state"]["step"] == 7


def test_resume_refusals_in_process(tmp_path, capsys):
    out = str(tmp_path / "moons")
    common = ["--log-every", "2", "--device", "cpu", "--quiet", "--model-kwargs", '{"hidden": 8, "depth": 1}']
    assert main(["train", "--data", "moons", "--out", out, "--steps", "2", *common]) == 0
    assert main(["train", "--out", out, "--resume", "--steps", "4", "--lr", "0.5"]) == 1       # a changed lr is refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr" in err and "config.json" in err
    assert main(["train", "--data", "moons", "--out", out, "--steps", "4"]) == 1              # no --resume: no overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--steps", "4", "--quiet"]) == 0
    assert load_checkpoint(out)["state"]["step"] == 4


@pytest.mark.parametrize("args, word", [
    (["train", "--data", "mnist", "--out", "{tmp}/a"], "data must be"),
    (["train", "--data", "moons", "--steps", "-3", "--out", "{tmp}/b"], "steps"),
    (["train", "--data", "{tmp}/nope.npy", "--out", "{tmp}/c"], "nope.npy"),
    (["train", "--data", "moons", "--device", "tpu0", "--out", "{tmp}/d"], "device"),
    (["train", "--data", "moons", "--out", "{tmp}/e", "--resume"], "latest"),
    (["train", "--data", "moons", "--batch-size", "many", "--out", "{tmp}/f"], "--batch-size"),
    (["train", "--data", "moons"], "--out"),
    (["fly"], "invalid choice"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, word):
    try: status = main([a.format(tmp=tmp_path) for a in args])
    except SystemExit as e: status = e.code                               # argparse's own errors exit directly
    err = capsys.readouterr().err.strip()
    assert status != 0 and len(err.splitlines()) == 1 and word in err, err
    assert not any(tmp_path.iterdir())                                    # nothing written for a bad run


@pytest.mark.slow
def test_bad_input_no_traceback_in_a_real_process(tmp_path):
    for args in (["train", "--data", "mnist", "--out", tmp_path / "a"], ["train", "--data", "moons", "--device", "tpu0", "--out", tmp_path / "b"],
                 ["train", "--data", "moons", "--steps", "x", "--out", tmp_path / "c"]):
        r = run(*args)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_unreadable_npy_in_process(tmp_path, capsys):
    np.save(tmp_path / "big.npy", np.full((4, 8, 8), 3.0))                 # floats outside [-1, 1]
    assert main(["train", "--data", str(tmp_path / "big.npy"), "--out", str(tmp_path / "run"), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[-1, 1]" in err


def test_options_map_to_config_fields():
    args = build_parser().parse_args(["train", "--out", "x", "--batch-size", "8", "--num-timesteps", "100", "--no-amp",
                                      "--ema-decay", "0.9", "--model-kwargs", '{"hidden": 8}'])
    fields = set(TrainConfig.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    assert given == dict(batch_size=8, num_timesteps=100, amp=False, ema_decay=0.9, model_kwargs={"hidden": 8})
    assert all(v is None for k, v in vars(args).items() if k in fields and k not in given)   # unset: None, not a default


def test_every_option_has_help():
    "Each subcommand's options carry a description (a wrapped docments comment once read as None)."
    import argparse
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                text = (action.help or "").replace("(default: %(default)s)", "").strip()
                assert text and not text.startswith("None"), (name, action.option_strings, action.help)


@pytest.mark.slow
def test_evaluate_pretrained_digits_end_to_end():
    r = run("evaluate", "--pretrained", "digits", "--sampler", "ddim", "--steps", 10, "--n", 80, "--seed", 0, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)                                          # stdout is exactly one JSON object
    assert {"fid", "kid", "inception_score", "precision", "recall", "density", "coverage", "n_samples", "n_reference"} <= set(scores)
    assert scores["n_samples"] == 80 and scores["n_reference"] == 1437 and scores["sampler"] == "ddim" and scores["steps"] == 10
    for key in ("fid", "kid", "inception_score", "precision", "recall", "density", "coverage"):
        assert np.isfinite(scores[key]).all(), (key, scores[key])
    assert scores["fid"] >= 0 and 1 <= scores["inception_score"][0] <= 10 and 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1


def test_evaluate_refuses_non_digit_models_in_one_line():
    r = run("evaluate", "--pretrained", "gmm8", "--n", 20, "--device", "cpu", "--quiet")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "8×8" in err and "(2,)" in err, err


@pytest.mark.parametrize("args, word", [
    (["evaluate", "--pretrained", "digits", "--n", "1"], "--n"),
    (["evaluate", "--n", "10"], "--checkpoint"),
    (["evaluate", "--pretrained", "digits", "--checkpoint", "x", "--n", "10"], "not allowed"),
])
def test_evaluate_bad_input_is_one_line(capsys, args, word):
    try: status = main(args)
    except SystemExit as e: status = e.code
    err = capsys.readouterr().err.strip()
    assert status != 0 and len(err.splitlines()) == 1 and word in err, err


def test_weights_auto_uses_raw_until_the_ema_has_warmed_up(tmp_path, capsys):
    common = ["--data", "moons", "--steps", "5", "--device", "cpu", "--quiet", "--prediction", "x0",
              "--num-timesteps", "100", "--model-kwargs", '{"hidden": 8, "depth": 1}']
    assert main(["train", "--out", str(tmp_path / "cold"), "--no-ema-warmup", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "warm"), *common]) == 0
    capsys.readouterr()
    draw = lambda run, *a: main(["sample", "--checkpoint", str(tmp_path / run), "--out", str(tmp_path / f"{run}.png"),
                                 "--n", "4", "--steps", "2", "--device", "cpu", "--quiet", *a])
    assert draw("cold") == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("note:") and "raw weights" in err and "--weights ema" in err
    assert draw("cold", "--weights", "ema") == 0 and capsys.readouterr().err == ""
    assert draw("warm") == 0 and capsys.readouterr().err == ""            # 5 warm-up steps: first weights 0.5 %
    assert main(["sample", "--pretrained", "gmm8", "--weights", "raw", "--out", str(tmp_path / "p.png")]) == 1
    assert "--weights raw" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "warm")["config"]["ema_warmup"] is True   # recorded in the config


def test_png_grids_are_large_gray_or_rgb_and_labelled(tmp_path, capsys):
    from PIL import Image
    from simple_diffusion.cli import _save_png
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    _save_png(x, str(tmp_path / "g.png"))
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "L" and min(im.size) >= 512                        # 73 px grid ×8 = 584 px, one channel
    grid = np.asarray(im)[:73 * 8:8, :73 * 8:8]                          # nearest-neighbour: every 8th pixel is the grid
    from simple_diffusion.core import make_grid
    assert np.array_equal(grid, (make_grid(x, nrow=8)[..., 0] * 255).round().astype(np.uint8))
    _save_png(torch.rand(4, 3, 8, 8) * 2 - 1, str(tmp_path / "c.png"), scale=3)
    im = Image.open(tmp_path / "c.png")
    assert im.mode == "RGB" and im.size == (19 * 3, 19 * 3)
    _save_png(x[:10], str(tmp_path / "l.png"), rows=2, labels=[str(k) for k in range(10)])
    assert Image.open(tmp_path / "l.png").mode == "RGB"
    with pytest.raises(ValueError, match="--scale"):
        _save_png(x, str(tmp_path / "bad.png"), scale=0)


def test_scatter_limits_ignore_outliers(tmp_path):
    from PIL import Image
    from simple_diffusion.cli import _save_scatter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    x[:3] = 1e4                                                          # three outliers must not shrink the data to a dot
    import matplotlib.figure
    seen = {}
    real = matplotlib.figure.Figure.savefig
    def spy(fig, *a, **k):
        ax = fig.axes[0]
        seen.update(xlim=ax.get_xlim(), ylim=ax.get_ylim(), title=ax.get_title())
        return real(fig, *a, **k)
    matplotlib.figure.Figure.savefig = spy
    try:
        _save_scatter(x, str(tmp_path / "s.png"))
    finally:
        matplotlib.figure.Figure.savefig = real
    span = seen["xlim"][1] - seen["xlim"][0]
    assert 4 < span < 10 and span == pytest.approx(seen["ylim"][1] - seen["ylim"][0])   # N(0,1): 99 % within ±2.6
    assert "outside the axes" in seen["title"] and Image.open(tmp_path / "s.png").mode == "RGB"


def test_labels_option_needs_a_class(tmp_path, capsys):
    assert main(["sample", "--pretrained", "digits", "--labels", "--n", "4", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 1
    assert "--labels" in capsys.readouterr().err


def test_threads_default_to_one_and_are_checked(tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        args = ["train", "--data", "moons", "--steps", "1", "--device", "cpu", "--quiet", "--model-kwargs", '{"hidden": 8}']
        assert main([*args, "--out", str(tmp_path / "a")]) == 0 and torch.get_num_threads() == 1
        assert main([*args, "--out", str(tmp_path / "b"), "--threads", "2"]) == 0 and torch.get_num_threads() == 2
        assert main([*args, "--out", str(tmp_path / "c"), "--threads", "0"]) == 1
        assert "--threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_shard_seeds():
    "Shard 0 keeps --seed (runs of <= SHARD samples are unchanged); other shards get distinct seeds."
    from simple_diffusion.cli import SHARD, _shard_seed
    assert SHARD == 1000 and _shard_seed(7, 0) == 7
    seeds = {_shard_seed(s, k) for s in range(5) for k in range(1, 50)}
    assert len(seeds) == 5 * 49 and all(0 <= v < 2**63 for v in seeds)


@pytest.mark.slow
def test_sample_under_torchrun_equals_one_process(tmp_path):
    "2 CPU ranks on gloo split the seeded shards (1000, 1000, 500) and gather: the same samples."
    exe = shutil.which("simple-diffusion", path=str(Path(sys.executable).parent))
    assert exe, "the console script is installed beside this Python"
    common = ["sample", "--pretrained", "gmm8", "--n", "2500", "--steps", "10", "--sampler",
              "ddpm", "--seed", "3", "--quiet"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([exe, *common, "--out", str(tmp_path / "a.png"), "--npy",
                          str(tmp_path / "a.npy")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--", exe, *common, "--out", str(tmp_path / "b.png"), "--npy",
                          str(tmp_path / "b.npy")], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote 2500 samples") == 1          # only rank 0 writes
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (2500, 2) and np.array_equal(a, b)
    assert not np.array_equal(a[:500], a[1000:1500])            # the shards are different draws


def test_end_option_reaches_the_sampler(tmp_path):
    "--end: the default is the sampler's own (DDIM below 20 steps: t0); --end zero is sample(..., end='zero')."
    from simple_diffusion import pretrained
    from simple_diffusion.cli import _shard_seed
    from simple_diffusion.sampling import sample
    got = {}
    for end in (None, "t0", "zero"):
        p = tmp_path / f"{end}.npy"
        assert main(["sample", "--pretrained", "gmm8", "--steps", "5", "--n", "16", "--device", "cpu", "--quiet",
                     "--npy", str(p), "--out", str(tmp_path / f"{end}.png"), *([] if end is None else ["--end", end])]) == 0
        got[end] = np.load(p)
    assert np.array_equal(got[None], got["t0"]) and not np.allclose(got["t0"], got["zero"], atol=1e-3)
    net, sched, cfg = pretrained.load("gmm8", device="cpu")
    want = sample(net, sched, (16, 2), "ddim", 5, prediction=cfg.prediction, end="zero",
                  generator=torch.Generator().manual_seed(_shard_seed(0, 0)))
    assert np.allclose(got["zero"], want.numpy(), atol=1e-6)
    with pytest.raises(SystemExit):                                      # argparse: not one of ENDS
        main(["sample", "--pretrained", "gmm8", "--steps", "5", "--end", "sigma0", "--npy", str(tmp_path / "x.npy")])
