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
        assert isinstance(cfg, TrainConfig) and cfg.to_dict() == info["train_config"]
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
    assert cfg.to_dict() == {**card("gmm8")["train_config"], "steps": 5}
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
