"""WY/UT kernels (kernels/gated_delta/wy.py) against the fp64 reference `wy_repr_ref`, forward and backward.

Without a GPU the Triton kernels run in the interpreter on small shapes; on a GPU machine the same tests run compiled.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, assert_close

from momctl.kernels.common.varlen import chunk_layout
from momctl.kernels.gated_delta import wy
from momctl.kernels.gated_delta.naive import recurrent_gated_delta_rule_ref, wy_repr_ref

F64 = torch.float64
LENGTHS = [0, 1, 17, 64, 65, 130]  # empty, shorter than a chunk, one chunk, a chunk and one, several chunks


def chunk_cumsum(g, lengths, chunk_size=64):
    """Per-chunk inclusive cumsum of g [1, T, H] over the packed segments: the g_cum the kernels take."""
    out, lo = torch.zeros_like(g), 0
    for n in lengths:
        for s in range(lo, lo + n, chunk_size):
            e = min(s + chunk_size, lo + n)
            out[:, s:e] = g[:, s:e].cumsum(1)
        lo += n
    return out


def make_inputs(gen, lengths, H, K, V, gated, dtype=torch.float32, decay_scale=1.0):
    """cu_seqlens and k (unit rows), v, beta, g_cum (fp32 or None) for packed segments of the given lengths."""
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen, dtype=F64)
    beta = torch.rand(1, T, H, generator=gen, dtype=F64)
    g_cum = None
    if gated:
        g_cum = chunk_cumsum(decay_scale * F.logsigmoid(torch.randn(1, T, H, generator=gen, dtype=F64)), lengths)
        g_cum = g_cum.float().to(DEVICE)
    k, v, beta = (x.to(dtype).to(DEVICE) for x in (k, v, beta))
    return cu.to(DEVICE), k, v, beta, g_cum


def reference(k, v, beta, g_cum, cu, dw, du):
    """fp64 (w, u, A_inv) and the gradients of sum(w * dw) + sum(u * du) w.r.t. k, v, beta (and g_cum)."""
    leaves = [x.detach().double().requires_grad_() for x in (k, v, beta)]
    if g_cum is not None:
        leaves.append(g_cum.detach().double().requires_grad_())
    w, u, A_inv = wy_repr_ref(*leaves[:3], leaves[3] if g_cum is not None else None, cu_seqlens=cu)
    grads = torch.autograd.grad((w * dw.double()).sum() + (u * du.double()).sum(), leaves)
    return (w, u, A_inv), grads


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element they forget fails the comparison."""
    monkeypatch.setattr(wy, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("K,V", [(16, 32), (32, 16)])
def test_fwd_bwd_match_reference_fp32(gen, K, V, H, gated):
    cu, k, v, beta, g_cum = make_inputs(gen, LENGTHS, H, K, V, gated)
    layout = chunk_layout(cu, 1, k.shape[1], 64, k.device)
    w, u, A_inv = wy.wy_fwd(k, v, beta, g_cum, layout)
    assert (w.dtype, u.dtype, A_inv.dtype, A_inv.shape) == (k.dtype, v.dtype, torch.float32, (1, k.shape[1], H, 64))
    dw = torch.randn(w.shape, generator=gen).to(DEVICE)
    du = torch.randn(u.shape, generator=gen).to(DEVICE)
    (w_ref, u_ref, A_ref), grads_ref = reference(k, v, beta, g_cum, cu, dw, du)
    assert_close(w, w_ref, 1e-5)
    assert_close(u, u_ref, 1e-5)
    assert_close(A_inv, A_ref, 1e-5)

    dk, dv, dbeta, dg = wy.wy_bwd(k, v, beta, g_cum, A_inv, dw, du, layout)
    assert (dk.dtype, dv.dtype, dbeta.dtype) == (k.dtype, v.dtype, beta.dtype)
    assert (dg is None) == (g_cum is None)
    for got, want in zip([dk, dv, dbeta] + ([dg] if gated else []), grads_ref, strict=True):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_given_A_inv_gives_the_same_w_and_u_without_solving(gen, gated, dtype):
    """The backward's call (A_inv from the forward's): w and u equal the solving call's bit for bit, and A_inv is
    returned as given, unchanged (no solve writes its scratch rows)."""
    cu, k, v, beta, g_cum = make_inputs(gen, LENGTHS, 2, 32, 16, gated, dtype=dtype)
    layout = chunk_layout(cu, 1, k.shape[1], 64, k.device)
    w, u, A_inv = wy.wy_fwd(k, v, beta, g_cum, layout)
    given = A_inv.clone()
    w2, u2, A_inv2 = wy.wy_fwd(k, v, beta, g_cum, layout, A_inv=given)
    assert A_inv2 is given and torch.equal(given, A_inv)
    assert torch.equal(w2, w) and torch.equal(u2, u)


@pytest.mark.parametrize("gated", [True, False])
def test_bf16_split_path(gen, gated):
    """bf16 k, v run the tensor-core path (fp32 operands split into bf16 hi + lo); fp32 upstream gradients too.

    The fp32 outputs (A_inv, dg_cum) keep near-fp32 accuracy; bf16 outputs are bounded by their final rounding
    (the interpreter truncates instead of rounding to nearest, hence the looser bound).
    """
    cu, k, v, beta, g_cum = make_inputs(gen, [0, 1, 65, 64], 2, 32, 32, gated, dtype=torch.bfloat16)
    layout = chunk_layout(cu, 1, k.shape[1], 64, k.device)
    w, u, A_inv = wy.wy_fwd(k, v, beta, g_cum, layout)
    dw = torch.randn(w.shape, generator=gen).to(DEVICE)  # fp32, not representable in bf16
    du = torch.randn(u.shape, generator=gen).to(DEVICE)
    (w_ref, u_ref, A_ref), grads_ref = reference(k, v, beta, g_cum, cu, dw, du)
    assert_close(A_inv, A_ref, 1e-4)
    assert_close(w, w_ref, 8e-3)
    assert_close(u, u_ref, 8e-3)
    dk, dv, dbeta, dg = wy.wy_bwd(k, v, beta, g_cum, A_inv, dw, du, layout)
    assert_close(dk, grads_ref[0], 8e-3)
    assert_close(dv, grads_ref[1], 8e-3)
    assert_close(dbeta, grads_ref[2], 8e-3)
    if gated:
        assert_close(dg, grads_ref[3], 1e-4)


def test_strong_decay_stays_finite(gen):
    """g = -50 a step: exp(g_i - g_j) above the diagonal would overflow if it were not masked before exp."""
    cu, k, v, beta, g_cum = make_inputs(gen, [70], 1, 16, 16, True)
    g_cum = chunk_cumsum(torch.full((1, 70, 1), -50.0, dtype=F64), [70]).float().to(DEVICE)
    layout = chunk_layout(cu, 1, 70, 64, k.device)
    w, u, A_inv = wy.wy_fwd(k, v, beta, g_cum, layout)
    dw, du = torch.randn(w.shape, generator=gen).to(DEVICE), torch.randn(u.shape, generator=gen).to(DEVICE)
    (w_ref, u_ref, A_ref), grads_ref = reference(k, v, beta, g_cum, cu, dw, du)
    for got, want in zip([w, u, A_inv, *wy.wy_bwd(k, v, beta, g_cum, A_inv, dw, du, layout)], [w_ref, u_ref, A_ref,
                                                                                             *grads_ref], strict=True):
        assert got.isfinite().all()
        assert_close(got, want, 1e-5)


def test_autograd_function_matches_reference(gen):
    cu, k, v, beta, g_cum = make_inputs(gen, [5, 64, 0, 70], 2, 16, 16, True)
    leaves = [x.clone().requires_grad_() for x in (k, v, beta, g_cum)]
    w, u, A_inv = wy.wy_repr(*leaves, cu_seqlens=cu)
    assert not A_inv.requires_grad
    dw, du = torch.randn(w.shape, generator=gen).to(DEVICE), torch.randn(u.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((w * dw).sum() + (u * du).sum(), leaves)
    _, grads_ref = reference(k, v, beta, g_cum, cu, dw, du)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, want, 1e-5)


def test_wy_repr_rejects_batched_input(gen):
    k = torch.randn(2, 8, 1, 16)
    with pytest.raises(ValueError, match=r"expected \[1, T, H, K\]"):
        wy.wy_repr(k, torch.randn(2, 8, 1, 16), torch.rand(2, 8, 1))


@pytest.mark.parametrize("gated", [True, False])
def test_reference_matches_loop(gen, gated):
    """The reference's factors advance a state exactly as the recurrence does: for a chunk starting from S_0,
    S_c = exp(G_c) S_0 + sum_j exp(G_c - G_j) k_j (u_j - S_0^T w_j)."""
    lengths, H, K, V = [1, 17, 64, 0], 2, 8, 6
    cu, k, v, beta, _ = make_inputs(gen, lengths, H, K, V, False, dtype=F64)
    k, v, beta, cu = k.cpu(), v.cpu(), beta.cpu(), cu.cpu()
    g = F.logsigmoid(torch.randn(1, k.shape[1], H, generator=gen, dtype=F64)) if gated else None
    h0 = torch.randn(len(lengths), H, K, V, generator=gen, dtype=F64)
    _, final = recurrent_gated_delta_rule_ref(k, k, v, beta, g, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm=False, cu_seqlens=cu)
    g_cum = chunk_cumsum(g, lengths) if gated else torch.zeros_like(beta)
    w, u, _ = wy_repr_ref(k, v, beta, g_cum if gated else None, cu_seqlens=cu)
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        G = g_cum[0, lo:hi]  # [c, H]
        if hi == lo:
            expected = h0[n]
        else:
            new = u[0, lo:hi] - torch.einsum("chk,hkv->chv", w[0, lo:hi], h0[n])
            expected = G[-1].exp()[:, None, None] * h0[n] + torch.einsum(
                "ch,chk,chv->hkv", (G[-1] - G).exp(), k[0, lo:hi], new
            )
        assert_close(final[n], expected, 1e-12)
