"""The notebooks are the source: committed without outputs, listed in the book, shaped like chapters."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))
TOC = (ROOT / "_toc.yml").read_text()


def cells(nb):
    return json.loads(nb.read_text())["cells"]


def src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_committed_without_outputs(nb):
    for i, c in enumerate(cells(nb)):
        if c["cell_type"] == "code":
            assert not c.get("outputs"), f"{nb.name}: cell {i} carries outputs (run `make strip`)"
            assert c.get("execution_count") is None, f"{nb.name}: cell {i} has an execution count"


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_listed_in_toc(nb):
    assert f"file: nbs/{nb.stem}" in TOC, f"{nb.name} is not in _toc.yml, so the book never executes it"


def test_chapter_numbers_unique():
    nums = [p.name[:2] for p in NBS if re.match(r"\d\d_", p.name)]
    assert len(nums) == len(set(nums))


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_chapter_anatomy(nb):
    cs = cells(nb)
    first = cs[0]
    assert src(first).startswith("#| default_exp "), f"{nb.name}: first cell must be #| default_exp"
    assert "remove-cell" in first["metadata"].get("tags", []), f"{nb.name}: hide the default_exp cell"
    colab = cs[1]
    assert "google.colab" in src(colab) and "skip-execution" in colab["metadata"].get("tags", [])
    assert any(c["cell_type"] == "markdown" and src(c).startswith("# ") for c in cs), f"{nb.name}: no H1 title"
    assert any("#| export" in src(c) for c in cs), f"{nb.name}: exports nothing"


def test_no_cuda_calls_in_library():
    for f in (ROOT / "simple_diffusion").glob("*.py"):
        assert ".cuda()" not in f.read_text(), f"{f.name}: device must follow the inputs"


@pytest.mark.parametrize("nb", NBS + sorted((ROOT / "nbs").glob("*.md")), ids=lambda p: p.name)
def test_no_control_characters(nb):
    "A non-raw Python string on the way into a notebook turns \\a, \\b, \\f, \\t of TeX into control characters."
    text = nb.read_text()
    sources = [src(c) for c in cells(nb)] if nb.suffix == ".ipynb" else [text]
    for i, s in enumerate(sources):
        bad = re.findall(r"[\x00-\x08\x0b-\x1f]", s) + re.findall(r"\t(?:imes|ilde|ext|heta|au|op|riangle)", s)
        assert not bad, f"{nb.name}: cell {i} holds {sorted(set(map(repr, bad)))} (a TeX command lost its backslash?)"


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_display_maths_typesets_in_colab_too(nb):
    "```{math} blocks are MyST-only and show as raw text in Jupyter/Colab; $$ ... $$ (label) renders in both."
    for i, c in enumerate(cells(nb)):
        if c["cell_type"] == "markdown":
            assert "```{math}" not in src(c), f"{nb.name}: cell {i} uses a ```{{math}} block; use $$ … $$ (label)"
