"""The routed-copy sums at the MoM layer's real shape on the GPU (`pytest -m gpu`): 32K tokens, 2 routed copies
plus the shared one, 1024 channels, bf16 kernels against the fp32 references; no host synchronisation. Run this file
on its own: CPU test modules collected beside it may switch Triton to the interpreter for the whole session."""

import os

import pytest
import torch
from kernel_checks import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, A, C = 32768, 3, 1024
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def cp():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 was set by another test module: run tests/kernels/test_copies_gpu.py alone")
    from momctl.kernels.copies import copies

    return copies


def real_inputs(seed=0):
    """A random permutation as the copy map (every row is some token's copy), mixing weights, y and d."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    copy_of_token = torch.randperm(N * A, generator=gen, device="cuda").reshape(N, A)
    weight = torch.rand(N, A, generator=gen, device="cuda").to(BF16)
    y = torch.randn(N * A, C, generator=gen, device="cuda").to(BF16)
    d = torch.randn(N, C, generator=gen, device="cuda").to(BF16)
    return copy_of_token, weight, y, d


def test_real_shape_matches_references(cp, monkeypatch):
    from momctl.kernels.copies import mix_copies_bwd_ref, sum_copies_ref

    monkeypatch.setattr(cp, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))
    copy_of_token, weight, y, d = real_inputs()
    assert_close(cp.sum_copies(y, copy_of_token, weight), sum_copies_ref(y.float(), copy_of_token, weight), 5e-3)
    assert_close(cp.sum_copies(y, copy_of_token, None), sum_copies_ref(y.float(), copy_of_token, None), 5e-3)
    d_y, d_w = cp.mix_copies_bwd(d, y, copy_of_token, weight)
    d_y_ref, d_w_ref = mix_copies_bwd_ref(d.float(), y.float(), copy_of_token, weight)
    assert_close(d_y, d_y_ref, 5e-3)
    assert_close(d_w, d_w_ref, 5e-3)


def test_no_host_sync(cp):
    copy_of_token, weight, y, d = real_inputs(1)
    for sync_mode in (0, "error"):  # the first round autotunes, which synchronises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            cp.sum_copies(y, copy_of_token, weight)
            cp.mix_copies_bwd(d, y, copy_of_token, weight)
        finally:
            torch.cuda.set_sync_debug_mode(0)
