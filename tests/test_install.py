"""The Colab install cell: every chapter installs from settings.ini's git_url, and that route
(`pip install git+URL`) really installs a working package, weights included (proved offline
with a local clone and a `git+file://` URL)."""
import configparser
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))


def git_url() -> str:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]["git_url"]


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_install_cell_uses_the_repository_url(nb):
    "The second cell installs exactly git+<git_url>, and only in Colab, skipped by the tests and the book."
    cell = json.loads(nb.read_text())["cells"][1]
    src = "".join(cell["source"])
    tags = cell["metadata"].get("tags", [])
    assert {"skip-execution", "nbval-skip", "remove-cell"} <= set(tags), nb.name
    assert 'if "google.colab" in sys.modules:' in src, nb.name
    pips = [line.strip() for line in src.splitlines() if "pip install" in line]
    assert pips == [f"%pip install -q git+{git_url()}"], (nb.name, pips)


@pytest.mark.slow
def test_pip_install_from_a_git_url(tmp_path):
    "pip install git+file://<clone of this repository> into a fresh venv; import it from elsewhere."
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", sha], check=True)
    # a fresh venv that sees this interpreter's packages (torch, setuptools, pip) but not this checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # the current venv's site-packages go after the new venv's own (a venv's "system" is the base
    # interpreter, not the venv the tests run in); .pth files there (the editable install) are not run
    Path(own, "current_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", f"git+file://{clone}@{sha}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import json, importlib.metadata as md, simple_diffusion, simple_diffusion.pretrained as p; "
            "print(json.dumps([simple_diffusion.__file__, simple_diffusion.__version__, "
            "sorted(f.name for f in p.weights_dir().iterdir()), p.available(), "
            "md.metadata('simple_diffusion').get_all('Provides-Extra'), "
            "md.requires('simple_diffusion')]))")
    r = subprocess.run([str(py), "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path, version, files, available, extras, requires = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(path).resolve().is_relative_to(Path(own).resolve()), path      # the installed copy
    shipped = sorted(f.name for f in (ROOT / "simple_diffusion" / "weights").iterdir()
                     if f.suffix in (".json", ".safetensors"))
    assert shipped and set(shipped) <= set(files), (shipped, files)            # package data shipped
    assert "digits" in available
    # the optional extra `pip install "simple_diffusion[diffusers]"` is declared from settings.ini
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    assert "diffusers" in extras
    for req in cfg["DEFAULT"]["diffusers_requirements"].split():
        assert any(r.startswith(req) and 'extra == "diffusers"' in r for r in requires), (req, requires)
    # the installed weights load and give a working model
    r = subprocess.run([str(py), "-c", "import torch, simple_diffusion.pretrained as p; "
                        "m, s, c = p.load('digits', device='cpu'); "
                        "print(tuple(m(torch.zeros(1, 1, 8, 8), torch.tensor([10])).shape))"],
                       cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("(1, 1, 8, 8)"), r.stderr[-3000:]
