"""The routed-copy sums (kernels/copies) against their PyTorch references, under TRITON_INTERPRET=1 on the CPU
(compiled when CUDA is there): mixing forward, its backward, and the gradient of gathered rows, on the real packing
of routed tokens with padding tokens, a memory no token picks, and every token on one memory."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from momctl.kernels.copies import copies, mix_copies_bwd_ref, sum_copies_ref
from momctl.packing import pack_tokens

F64 = torch.float64


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element no kernel writes fails the comparison."""
    monkeypatch.setattr(copies, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))


def routed_packing(gen, B, T, E, top_k, routing):
    """The packing of B x T tokens routed to top_k of E memories plus a shared one; the last 3 tokens of sequence
    0 are padding. routing: 'random', 'skip_last' (memory E-1 gets no token) or 'one' (all routed to memory 0)."""
    scores = torch.rand(B, T, E, generator=gen)
    if routing == "skip_last":
        scores[..., E - 1] = -1
    elif routing == "one":
        scores[..., 0] = 2
    w, slots = scores.topk(top_k, dim=-1)
    slots = torch.cat([slots, torch.full((B, T, 1), E)], -1)
    weights = torch.cat([w.softmax(-1), torch.ones(B, T, 1)], -1)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, -3:] = False
    return pack_tokens(slots.to(DEVICE), weights.to(DEVICE), valid.to(DEVICE), E + 1)


@pytest.mark.parametrize("routing", ["random", "skip_last", "one"])
@pytest.mark.parametrize("C", [20, 64])
def test_copy_sums_match_references(gen, routing, C):
    p = routed_packing(gen, 2, 9, 4, 2, routing)
    N, A = p.copy_of_token_NA.shape
    y = torch.randn(N * A, C, generator=gen).to(DEVICE)
    d = torch.randn(N, C, generator=gen).to(DEVICE)
    w = p.weight_NA.float()
    assert_close(copies.sum_copies(y, p.copy_of_token_NA, w), sum_copies_ref(y.double(), p.copy_of_token_NA,
                                                                               w.double()), 1e-6)
    assert_close(copies.sum_copies(y, p.copy_of_token_NA, None), sum_copies_ref(y.double(), p.copy_of_token_NA,
                                                                                  None), 1e-6)
    d_y, d_w = copies.mix_copies_bwd(d, y, p.copy_of_token_NA, w)
    d_y_ref, d_w_ref = mix_copies_bwd_ref(d.double(), y.double(), p.copy_of_token_NA, w.double())
    assert d_y.dtype == y.dtype and d_w.dtype == torch.float32
    assert_close(d_y, d_y_ref, 1e-6)
    assert_close(d_w, d_w_ref, 1e-6)


def test_reference_backward_is_autograd_of_the_mix(gen):
    """mix_copies_bwd_ref is the true gradient of sum_copies_ref (fp64 autograd)."""
    p = routed_packing(gen, 1, 7, 3, 2, "random")
    N, A = p.copy_of_token_NA.shape
    y = torch.randn(N * A, 5, generator=gen, dtype=F64).to(DEVICE).requires_grad_()
    w = p.weight_NA.double().requires_grad_()
    d = torch.randn(N, 5, generator=gen, dtype=F64).to(DEVICE)
    grads = torch.autograd.grad((sum_copies_ref(y, p.copy_of_token_NA, w) * d).sum(), [y, w])
    for actual, expected in zip(mix_copies_bwd_ref(d, y.detach(), p.copy_of_token_NA, w.detach()), grads,
                                strict=True):
        assert_close(actual, expected, 1e-12)


def test_empty_batch():
    copy_of_token = torch.empty(0, 3, dtype=torch.long, device=DEVICE)
    y = torch.empty(0, 8, device=DEVICE)
    assert copies.sum_copies(y, copy_of_token, None).shape == (0, 8)
    d_y, d_w = copies.mix_copies_bwd(torch.empty(0, 8, device=DEVICE), y, copy_of_token, torch.empty(0, 3,
                                                                                                     device=DEVICE))
    assert d_y.shape == (0, 8) and d_w.shape == (0, 3)
