"""Contracts of simple_diffusion.core helpers."""
import pytest
import torch

from simple_diffusion.core import full_run, glue, make_grid, pick_device


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="device='tpu'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_full_run(monkeypatch):
    monkeypatch.delenv("SIMPLE_DIFFUSION_FULL", raising=False)
    assert not full_run()
    monkeypatch.setenv("SIMPLE_DIFFUSION_FULL", "1")
    assert full_run()


def test_glue_returns_value():
    assert glue("x", 3) == 3


def test_make_grid_places_images():
    imgs = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    g = make_grid(imgs, nrow=2, padding=1, pad_value=-1)
    assert g.shape == (7, 7, 1)
    assert g[1, 1, 0] == 0 and g[1, 4, 0] == 0.5 and g[4, 1, 0] == 1.0   # -1 -> 0, 0 -> 0.5, 1 -> 1
    with pytest.raises(ValueError, match="images"):
        make_grid(torch.zeros(2, 8, 8))
