"""Shared pytest configuration: the `gpu` marker skips cleanly where CUDA is absent."""
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    "Every test that takes `device` runs on the CPU and, where available, on CUDA."
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    "Tiny tensors: one intra-op thread is several times faster than two on a shared CPU; restored afterwards."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
