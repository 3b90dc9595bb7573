"""Gated delta rule (and delta rule, g=None), chunkwise-parallel Triton kernels, forward and backward.

Forward: rstd of q, k (the kernels scale by it: no normalised copies) -> chunk-local cumsum of g -> WY factors w, u
(wy.py) -> chunk-start states h and
v_new = u - w h (sequential over chunks) -> outputs. Backward recomputes w, u (from the forward's (I + A)^-1, with no
solve), h and v_new, then dv_local -> state gradients dh and dv_new (sequential, reversed) -> dq, dk, dw, dG -> WY
backward -> dg, dq, dk. The state passes run over value-column slices (kernels/common/state_passes.py). Only the
inputs, small per-token values and the chunks' (I + A)^-1 (fp32, 64 per position and head) are kept for backward.
See kernels/common/README.md.
"""
# Shapes: B batch, T time, H heads, K key dim, V value dim, N segments.
# No `from __future__ import annotations`: torch.library reads the custom ops' signatures from real annotations.

import torch
from torch import Tensor

from ..common.cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from ..common.l2norm import l2norm_bwd, l2norm_rstd
from ..common.launch import CHUNK_SIZE
from ..common.state_passes import state_gradients, states_and_output
from ..gated.chunk import (
    cast_grads,
    check_chunk_inputs,
    compute_dtype,
    empty_backward,
    empty_forward,
    empty_if_none,
    fake_fwd_outputs,
    layout_of,
    pack,
)
from .wy import wy_bwd, wy_fwd


def chunk_gated_delta_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                          initial_state: Tensor | None, cu_seqlens: Tensor | None, scale: float,
                          output_final_state: bool, use_qk_l2norm: bool):
    """Packed forward. Returns o `[1, B*T, H, V]` (compute dtype), the final state or None, and what backward
    needs besides the inputs: the rstd of q and k (None without use_qk_l2norm), g_cum (or None) and the chunks'
    fp32 (I + A)^-1 `[1, B*T, H, 64]` (`wy_fwd`'s A_inv: the backward's w and u need no solve)."""
    if q.shape[0] * q.shape[1] == 0:
        return *empty_forward(q, k, v, g, initial_state, output_final_state), q.new_empty(1, 0, q.shape[2], CHUNK_SIZE,
                                                                                           dtype=torch.float32)
    layout = layout_of(q, cu_seqlens)
    dtype = compute_dtype(q, k, v)
    q, k, v, beta = pack(q, dtype), pack(k, dtype), pack(v, dtype), pack(beta)
    rstd_q, rstd_k = (l2norm_rstd(q), l2norm_rstd(k)) if use_qk_l2norm else (None, None)
    g_cum = None if g is None else chunk_cumsum_fwd(pack(g), layout)
    w, u, A_inv = wy_fwd(k, v, beta, g_cum, layout, rstd_k)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = states_and_output(q, k, u, w, g_cum, h0, layout, scale, output_final_state, rstd_q, rstd_k)
    return o, ht, rstd_q, rstd_k, g_cum, A_inv


def chunk_gated_delta_bwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g_cum: Tensor | None,
                          initial_state: Tensor | None, cu_seqlens: Tensor | None, rstd_q: Tensor | None,
                          rstd_k: Tensor | None, A_inv: Tensor, do: Tensor, dht: Tensor | None, scale: float):
    """Packed backward from the inputs and what `chunk_gated_delta_fwd` kept (rstd: `[B, T, H]`, or None).

    Returns dq, dk `[1, B*T, H, K]`, dv `[1, B*T, H, V]` (compute dtype), dbeta `[1, B*T, H]`, dg `[1, B*T, H]` fp32
    or None, dh0 or None.
    """
    if q.shape[0] * q.shape[1] == 0:
        return empty_backward(q, k, v, g_cum, initial_state, dht)
    layout = layout_of(q, cu_seqlens)
    dtype = compute_dtype(q, k, v)
    q, k, v, beta, do = pack(q, dtype), pack(k, dtype), pack(v, dtype), pack(beta), pack(do, dtype)
    rstd_q, rstd_k = (None, None) if rstd_q is None else (pack(rstd_q), pack(rstd_k))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    dht = None if dht is None else dht.float().contiguous()
    w, u, _ = wy_fwd(k, v, beta, g_cum, layout, rstd_k, A_inv)
    grads, dv_new, dh0 = state_gradients(q, k, u, w, g_cum, h0, do, dht, layout, scale, rstd_q, rstd_k)
    del w, u
    dq, dk = grads.dq, grads.dk
    dk_wy, dv, dbeta, dG_wy = wy_bwd(k, v, beta, g_cum, A_inv, grads.dw, dv_new, layout, rstd_k)
    dg = None if g_cum is None else chunk_cumsum_bwd(grads.dG, layout, torch.float32, dG_wy)
    if rstd_q is not None:
        dq = l2norm_bwd(q, rstd_q, dq)
        dk = l2norm_bwd(k, rstd_k, dk, dk_wy.contiguous())
    else:
        dk = dk + dk_wy
    return dq, dk, dv, dbeta, dg, dh0


# Custom ops, opaque to torch.compile; the same conventions as in kernels/gated/chunk.py.


@torch.library.custom_op("momctl::chunk_gated_delta_rule_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, initial_state: Tensor | None,
            cu_seqlens: Tensor | None, scale: float, output_final_state: bool, use_qk_l2norm: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, K = q.shape
    o, ht, rstd_q, rstd_k, g_cum, A_inv = chunk_gated_delta_fwd(q, k, v, beta, g, initial_state, cu_seqlens, scale,
                                                                output_final_state, use_qk_l2norm)
    return (o.view(v.shape).to(v.dtype), empty_if_none(ht, q), empty_if_none(rstd_q, q, (B, T, H)),
            empty_if_none(rstd_k, q, (B, T, H)), empty_if_none(g_cum, q, (B, T, H)), A_inv)


@_fwd_op.register_fake
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm):
    B, T, H, K = q.shape
    return (*fake_fwd_outputs(q, k, v, g, cu_seqlens, output_final_state, use_qk_l2norm),
            q.new_empty((1, B * T, H, CHUNK_SIZE), dtype=torch.float32))


@torch.library.custom_op("momctl::chunk_gated_delta_rule_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g_cum: Tensor | None, initial_state: Tensor | None,
            cu_seqlens: Tensor | None, rstd_q: Tensor | None, rstd_k: Tensor | None, A_inv: Tensor, do: Tensor,
            dht: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, K = q.shape
    g_cum = None if g_cum is None else pack(g_cum)
    dq, dk, dv, dbeta, dg, dh0 = chunk_gated_delta_bwd(q, k, v, beta, g_cum, initial_state, cu_seqlens, rstd_q,
                                                       rstd_k, A_inv, do, dht, scale)
    return (dq.view(q.shape), dk.view(q.shape), dv.view(v.shape), dbeta.view(B, T, H).float(),
            empty_if_none(dg, q, (B, T, H)), empty_if_none(dh0, q))


@_bwd_op.register_fake
def _(q, k, v, beta, g_cum, initial_state, cu_seqlens, rstd_q, rstd_k, A_inv, do, dht, scale):
    dtype, f32 = compute_dtype(q, k, v), torch.float32
    return (q.new_empty(q.shape, dtype=dtype), q.new_empty(q.shape, dtype=dtype), q.new_empty(v.shape, dtype=dtype),
            q.new_empty(q.shape[:3], dtype=f32), q.new_empty(q.shape[:3] if g_cum is not None else (0,), dtype=f32),
            q.new_empty(initial_state.shape if initial_state is not None else (0,), dtype=f32))


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm = inputs
    _, _, rstd_q, rstd_k, g_cum, A_inv = output
    rstd = (rstd_q, rstd_k) if use_qk_l2norm else (None, None)
    ctx.save_for_backward(q, k, *rstd, v, beta, None if g is None else g_cum, A_inv, initial_state, cu_seqlens)
    ctx.scale, ctx.output_final_state = scale, output_final_state
    ctx.dtypes = [None if x is None else x.dtype for x in (q, k, v, beta, g, initial_state)]
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, *_):
    q, k, rstd_q, rstd_k, v, beta, g_cum, A_inv, initial_state, cu_seqlens = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    dht = dht if ctx.output_final_state else None
    grads = torch.ops.momctl.chunk_gated_delta_rule_bwd(q, k, v, beta, g_cum, initial_state, cu_seqlens, rstd_q,
                                                        rstd_k, A_inv, do, dht, ctx.scale)
    return *cast_grads(grads, ctx.dtypes), None, None, None, None


torch.library.register_autograd("momctl::chunk_gated_delta_rule_fwd", _backward, setup_context=_setup_context)


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule with chunkwise-parallel Triton kernels; same result as `recurrent_gated_delta_rule_ref`.

    S_i = exp(g_i) (I - beta_i k_i k_i^T) S_{i-1} + beta_i k_i v_i^T,  o_i = scale * S_i^T q_i.  Differentiable in
    q, k, v, beta, g, initial_state; no host synchronisation; opaque to torch.compile (custom ops
    momctl::chunk_gated_delta_rule_fwd / _bwd).

    Args:
        q: [B, T, H, K] queries (K <= 256).
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        g: [B, T, H] log decays (alpha = exp(g)), or None for the plain delta rule (alpha = 1).
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        use_qk_l2norm: l2-normalise q and k over K first: x / sqrt(|x|^2 + 1e-6).
        cu_seqlens: [N + 1] integer offsets of N packed segments (B must be 1, empty segments allowed),
            or None for N = B independent sequences. Its values are checked only when it is on the CPU.

    Returns:
        o [B, T, H, V] in v.dtype, and the final state [N, H, K, V] in float32 or None unless output_final_state.
        The kernels compute in the common dtype of q, k, v (bf16, fp16 or fp32; otherwise fp32), with fp32 states.
    """
    check_chunk_inputs(q, k, v, beta, g, initial_state, cu_seqlens, has_beta=True)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht, *_ = torch.ops.momctl.chunk_gated_delta_rule_fwd(q, k, v, beta, g, initial_state, cu_seqlens, scale,
                                                             bool(output_final_state), bool(use_qk_l2norm))
    return o, ht if output_final_state else None
