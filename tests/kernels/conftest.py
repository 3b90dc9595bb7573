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
