"""Fixtures shared by the kernel tests."""

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation, which is slow on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison_chunk_buffers(monkeypatch):
    """Fresh buffers of the chunk-rule kernels start as NaN, so an element no kernel writes fails the comparison."""
    from momctl.kernels.common import chunk_output, chunk_state, cumsum, l2norm, state_passes
    from momctl.kernels.gated_delta import wy

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (chunk_output, chunk_state, cumsum, l2norm, state_passes, wy):
        monkeypatch.setattr(module, "_empty", nan_empty)
