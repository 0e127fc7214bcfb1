"The README's examples, run from a temporary folder: the Python snippets verbatim, the CLI examples with small --steps."
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
CLI = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
       for line in block.splitlines() if line.startswith("simple-diffusion ")]


def small(args):
    "The same command with 2 steps (training and sampling) and at most 100 samples."
    out, it = [], iter(args)
    for a in it:
        out.append(a)
        if a == "--steps":
            out.append("2"); next(it)
        elif a == "--n":
            out.append(str(min(int(next(it)), 100)))   # evaluate: N > 64 features
    return out + (["--quiet", "--device", "cpu"] if args[0] in ("train", "sample", "evaluate") else [])


def test_the_readme_has_examples():
    assert len(PYTHON) >= 2 and len(CLI) >= 8


@pytest.mark.parametrize("i", range(len(PYTHON)))
def test_python_snippets_run_verbatim(i, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON[i], f"README snippet {i}", "exec"), {})


@pytest.mark.slow
def test_cli_examples_run(tmp_path, monkeypatch, capsys, one_thread):
    from simple_diffusion.cli import main
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("my_images.npy", rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))   # the user's own file
    for line in CLI:
        args = small(shlex.split(line)[1:])
        try:
            status = main(args)
        except SystemExit as e:                                          # --version exits through argparse
            status = e.code
        out = capsys.readouterr()
        assert status == 0, (line, out.err)
    for f in ("digits.png", "digits.npy", "classes.png", "mine.png", "runs/digits/latest", "runs/mine/latest"):
        assert Path(f).is_file(), f
