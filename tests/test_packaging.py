"""Packaging contracts: metadata from settings.ini, the built wheel, environment.yml, the book config."""
import configparser
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def settings():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def test_version_matches_settings():
    import simple_diffusion
    assert simple_diffusion.__version__ == settings()["version"]


def test_torch_requirement_has_no_upper_cap():
    reqs = settings()["requirements"].split()
    torch_req = [r for r in reqs if r.startswith("torch")]
    assert torch_req == ["torch>=2.1"]
    assert not any(r.startswith("torchvision") for r in reqs), "torchvision must stay optional"


def _yaml_pip_section(path):
    "The pip: list of environment.yml (a tiny reader: the file is plain, no anchors)."
    lines, out, inside = path.read_text().splitlines(), [], False
    for line in lines:
        s = line.strip()
        if s == "- pip:":
            inside = True
            continue
        if inside:
            if s.startswith("- "):
                out.append(s[2:].strip())
            elif s and not s.startswith("#"):
                break
    return out


def test_environment_yml_mirrors_settings():
    cfg = settings()
    expect = cfg["requirements"].split() + cfg["dev_requirements"].split()
    got = _yaml_pip_section(ROOT / "environment.yml")
    assert sorted(got) == sorted(expect)


def test_repository_url_in_one_place():
    cfg_text = (ROOT / "_config.yml").read_text()
    url = settings()["git_url"]
    assert f"url: {url}" in cfg_text
    # the Colab cells install from the same repository
    for nb in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"):
        text = nb.read_text()
        assert f"git+{url}" in text, f"{nb.name}: Colab cell must install from {url}"


@pytest.mark.slow
def test_wheel_metadata_and_import_from_anywhere(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    (whl,) = dist.glob("simple_diffusion-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    cfg = settings()
    assert meta["Name"] == "simple_diffusion" and meta["Version"] == cfg["version"]
    requires = meta.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert sorted(base) == sorted(cfg["requirements"].split())
    assert any(r.startswith("torch>=2.1") and "<" not in r for r in base)
    assert "simple_diffusion/schedules.py" in names and "simple_diffusion/forward.py" in names
    # install the wheel into a fresh target and import it from an unrelated folder
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", "import simple_diffusion, simple_diffusion.forward as f; "
                          "print(simple_diffusion.__version__); print(f.__file__)"],
                         cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == cfg["version"] and out[1].startswith(str(target))


def test_exported_modules_read_as_plain_python():
    "Lines ≤ 100 characters (the `__all__` list nbdev wraps at 120 aside) and no module attribute set to None by @patch."
    import importlib
    too_long = []
    for f in sorted((ROOT / "simple_diffusion").glob("*.py")):
        if f.name == "_modidx.py":
            continue
        in_all = False
        for i, line in enumerate(f.read_text().splitlines(), 1):
            in_all = line.startswith("__all__") or (in_all and line.startswith(" "))
            if len(line) > 100 and not in_all:
                too_long.append(f"{f.name}:{i}")
        mod = importlib.import_module(f"simple_diffusion.{f.stem}")
        nones = [k for k, v in vars(mod).items() if v is None and not k.startswith("_")]
        assert not nones, (f.name, nones)
    assert not too_long, too_long
