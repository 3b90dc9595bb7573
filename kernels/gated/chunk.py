"""Gated linear attention (and linear attention, g=None), chunkwise-parallel Triton kernels, forward and backward.

Forward: l2norm(q, k) -> chunk-local cumsum of g -> chunk-start states h (sequential over chunks) -> outputs.
Backward recomputes h, then dv_local -> state gradients dh (sequential, reversed) -> dq, dk, dG -> dg, dq, dk.
The state passes run over value-column slices (kernels/common/state_passes.py).
Only the inputs and small per-token values are kept for backward. See kernels/common/README.md.
"""
# Shapes: B batch, T time, H heads, K key dim, V value dim, N segments.
# No `from __future__ import annotations`: torch.library reads the custom ops' signatures from real annotations.

import torch
from torch import Tensor

from .._ref_utils import _check_shape, _segments
from ..common.chunk_state import MAX_K
from ..common.cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from ..common.l2norm import l2norm_bwd, l2norm_rstd
from ..common.launch import CHUNK_SIZE, INTERPRETED
from ..common.state_passes import state_gradients, states_and_output
from ..common.varlen import ChunkLayout, chunk_layout

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_chunk_inputs(q: object, k: object, v: object, beta: object, g: object, initial_state: object,
                       cu_seqlens: object, *, has_beta: bool) -> None:
    """Raise ValueError (the references' messages) unless the inputs fit the chunk kernels; reads no device value.

    cu_seqlens values are checked only when it is a CPU tensor outside torch.compile; on the GPU that would need a
    host synchronisation, so there only its type and shape are checked.
    """
    _check_shape("q", q, (None, None, None, None), "[B, T, H, K]")
    B, T, H, K = q.shape
    _check_shape("k", k, (B, T, H, K), "[B, T, H, K]")
    _check_shape("v", v, (B, T, H, None), "[B, T, H, V]")
    if has_beta:
        _check_shape("beta", beta, (B, T, H), "[B, T, H]")
    if g is not None:
        _check_shape("g", g, (B, T, H), "[B, T, H]")
    N = B
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, Tensor) and cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            _segments(cu_seqlens, B, T)
        elif not isinstance(cu_seqlens, Tensor) or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            raise ValueError("cu_seqlens must be an integer tensor [N+1] of segment offsets")
        elif cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens has shape {tuple(cu_seqlens.shape)}, expected [N+1] = (N+1,) with N >= 1")
        elif B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1: q has B = {B}, expected [1, T, H, K]")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (N, H, K, v.shape[-1]), "[N, H, K, V]")
    if K > MAX_K:
        raise ValueError(f"q has K = {K}, the chunk kernels take K <= {MAX_K}: use the references in naive.py")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"q is on {q.device}: the chunk kernels need a CUDA device (or TRITON_INTERPRET=1)")


def compute_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The kernels' operand dtype: the common dtype of q, k, v when the kernels take it, else float32."""
    return q.dtype if q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES else torch.float32


def pack(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[B, T, ...] -> contiguous [1, B * T, ...] (in dtype when given)."""
    x = x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])
    return (x if dtype is None else x.to(dtype)).contiguous()


def layout_of(q: Tensor, cu_seqlens: Tensor | None) -> ChunkLayout:
    return chunk_layout(cu_seqlens, q.shape[0], q.shape[1], CHUNK_SIZE, q.device)


def empty_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None,
                  output_final_state: bool):
    """The packed forward of no position at all: nothing to launch (empty tensors may have no device memory)."""
    B, T, H, K = q.shape
    N, V, dtype = (B if initial_state is None else initial_state.shape[0]), v.shape[-1], compute_dtype(q, k, v)
    ht = None
    if output_final_state:
        ht = q.new_zeros(N, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    f32 = torch.float32
    rstd = q.new_empty(1, 0, H, dtype=f32)
    g_cum = None if g is None else q.new_empty(1, 0, H, dtype=f32)
    return q.new_empty(1, 0, H, V, dtype=dtype), ht, rstd, rstd.clone(), g_cum


def empty_backward(q: Tensor, k: Tensor, v: Tensor, g_cum: Tensor | None, initial_state: Tensor | None,
                   dht: Tensor | None):
    """The packed backward of no position: dq, dk, dv, dbeta, dg (or None) and dh0 = dht (or None)."""
    _, _, H, K = q.shape
    dtype, f32 = compute_dtype(q, k, v), torch.float32
    dh0 = None
    if initial_state is not None:
        dh0 = torch.zeros_like(initial_state, dtype=f32) if dht is None else dht.float().clone()
    return (q.new_empty(1, 0, H, K, dtype=dtype), q.new_empty(1, 0, H, K, dtype=dtype),
            q.new_empty(1, 0, H, v.shape[-1], dtype=dtype), q.new_empty(1, 0, H, dtype=f32),
            None if g_cum is None else q.new_empty(1, 0, H, dtype=f32), dh0)


def chunk_gated_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None,
                    cu_seqlens: Tensor | None, scale: float, output_final_state: bool, use_qk_l2norm: bool):
    """Packed forward. Returns o `[1, B*T, H, V]` (compute dtype), the final state or None, and what backward
    needs besides the inputs: the rstd of q and k (None without use_qk_l2norm) and g_cum (or None). The kernels
    scale by rstd where they use a normalised row, so no normalised copy of q or k is made."""
    if q.shape[0] * q.shape[1] == 0:
        return empty_forward(q, k, v, g, initial_state, output_final_state)
    layout = layout_of(q, cu_seqlens)
    dtype = compute_dtype(q, k, v)
    q, k, v = pack(q, dtype), pack(k, dtype), pack(v, dtype)
    rstd_q, rstd_k = (l2norm_rstd(q), l2norm_rstd(k)) if use_qk_l2norm else (None, None)
    g_cum = None if g is None else chunk_cumsum_fwd(pack(g), layout)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = states_and_output(q, k, v, None, g_cum, h0, layout, scale, output_final_state, rstd_q, rstd_k)
    return o, ht, rstd_q, rstd_k, g_cum


def chunk_gated_bwd(q: Tensor, k: Tensor, v: Tensor, g_cum: Tensor | None, initial_state: Tensor | None,
                    cu_seqlens: Tensor | None, rstd_q: Tensor | None, rstd_k: Tensor | None, do: Tensor,
                    dht: Tensor | None, scale: float):
    """Packed backward from the inputs and what `chunk_gated_fwd` kept (rstd: `[B, T, H]`, or None).

    Returns dq, dk `[1, B*T, H, K]`, dv `[1, B*T, H, V]` (compute dtype), dg `[1, B*T, H]` fp32 or None, dh0 or None.
    """
    if q.shape[0] * q.shape[1] == 0:
        dq, dk, dv, _, dg, dh0 = empty_backward(q, k, v, g_cum, initial_state, dht)
        return dq, dk, dv, dg, dh0
    layout = layout_of(q, cu_seqlens)
    dtype = compute_dtype(q, k, v)
    q, k, v, do = pack(q, dtype), pack(k, dtype), pack(v, dtype), pack(do, dtype)
    rstd_q, rstd_k = (None, None) if rstd_q is None else (pack(rstd_q), pack(rstd_k))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    dht = None if dht is None else dht.float().contiguous()
    grads, dv, dh0 = state_gradients(q, k, v, None, g_cum, h0, do, dht, layout, scale, rstd_q, rstd_k)
    dg = None if g_cum is None else chunk_cumsum_bwd(grads.dG, layout, torch.float32)
    dq, dk = grads.dq, grads.dk
    if rstd_q is not None:
        dq = l2norm_bwd(q, rstd_q, dq)
        dk = l2norm_bwd(k, rstd_k, dk)
    return dq, dk, dv, dg, dh0


# Custom ops, opaque to torch.compile. A custom op cannot return None or alias an input: an absent result is an
# empty tensor, dropped by the Python wrappers. The forward op also returns what backward keeps besides the inputs
# (rstd, g_cum), since register_autograd saves only the op's inputs and outputs.


def empty_if_none(x: Tensor | None, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """x (viewed as shape), or a fresh empty tensor when x is None."""
    if x is None:
        return like.new_empty(0)
    return x if shape is None else x.view(shape)


@torch.library.custom_op("momctl::chunk_gated_rule_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None,
            cu_seqlens: Tensor | None, scale: float, output_final_state: bool, use_qk_l2norm: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, K = q.shape
    o, ht, rstd_q, rstd_k, g_cum = chunk_gated_fwd(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state,
                                                   use_qk_l2norm)
    return (o.view(v.shape).to(v.dtype), empty_if_none(ht, q), empty_if_none(rstd_q, q, (B, T, H)),
            empty_if_none(rstd_k, q, (B, T, H)), empty_if_none(g_cum, q, (B, T, H)))


@_fwd_op.register_fake
def _(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm):
    return fake_fwd_outputs(q, k, v, g, cu_seqlens, output_final_state, use_qk_l2norm)


def fake_fwd_outputs(q, k, v, g, cu_seqlens, output_final_state, use_qk_l2norm):
    """Empty tensors shaped like the forward ops' outputs (o, ht, rstd_q, rstd_k, g_cum)."""
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = torch.float32
    rstd_shape = (B, T, H) if use_qk_l2norm else (0,)
    return (
        v.new_empty(v.shape),
        q.new_empty((N, H, K, v.shape[-1]) if output_final_state else (0,), dtype=f32),
        q.new_empty(rstd_shape, dtype=f32),
        q.new_empty(rstd_shape, dtype=f32),
        q.new_empty((B, T, H) if g is not None else (0,), dtype=f32),
    )


@torch.library.custom_op("momctl::chunk_gated_rule_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, g_cum: Tensor | None, initial_state: Tensor | None,
            cu_seqlens: Tensor | None, rstd_q: Tensor | None, rstd_k: Tensor | None, do: Tensor, dht: Tensor | None,
            scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, K = q.shape
    g_cum = None if g_cum is None else pack(g_cum)
    dq, dk, dv, dg, dh0 = chunk_gated_bwd(q, k, v, g_cum, initial_state, cu_seqlens, rstd_q, rstd_k, do, dht, scale)
    return (dq.view(q.shape), dk.view(q.shape), dv.view(v.shape), empty_if_none(dg, q, (B, T, H)),
            empty_if_none(dh0, q))


@_bwd_op.register_fake
def _(q, k, v, g_cum, initial_state, cu_seqlens, rstd_q, rstd_k, do, dht, scale):
    dtype = compute_dtype(q, k, v)
    return (q.new_empty(q.shape, dtype=dtype), q.new_empty(q.shape, dtype=dtype), q.new_empty(v.shape, dtype=dtype),
            q.new_empty(q.shape[:3] if g_cum is not None else (0,), dtype=torch.float32),
            q.new_empty(initial_state.shape if initial_state is not None else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm = inputs
    _, _, rstd_q, rstd_k, g_cum = output
    rstd = (rstd_q, rstd_k) if use_qk_l2norm else (None, None)
    ctx.save_for_backward(q, k, *rstd, v, None if g is None else g_cum, initial_state, cu_seqlens)
    ctx.scale, ctx.output_final_state = scale, output_final_state
    ctx.dtypes = [None if x is None else x.dtype for x in (q, k, v, g, initial_state)]
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, *_):
    q, k, rstd_q, rstd_k, v, g_cum, initial_state, cu_seqlens = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    dht = dht if ctx.output_final_state else None
    grads = torch.ops.momctl.chunk_gated_rule_bwd(q, k, v, g_cum, initial_state, cu_seqlens, rstd_q, rstd_k, do, dht,
                                                  ctx.scale)
    return *cast_grads(grads, ctx.dtypes), None, None, None, None


def cast_grads(grads, dtypes):
    """Each gradient in its input's dtype; None where the input was None."""
    return tuple(None if dtype is None else grad.to(dtype) for grad, dtype in zip(grads, dtypes, strict=True))


torch.library.register_autograd("momctl::chunk_gated_rule_fwd", _backward, setup_context=_setup_context)


def chunk_gated_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention with chunkwise-parallel Triton kernels; same result as `recurrent_gated_rule_ref`.

    S_i = exp(g_i) S_{i-1} + k_i v_i^T,  o_i = scale * S_i^T q_i.  Differentiable in q, k, v, g, initial_state;
    no host synchronisation; opaque to torch.compile (custom ops momctl::chunk_gated_rule_fwd / _bwd).

    Args:
        q: [B, T, H, K] queries (K <= 256).
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log decays (alpha = exp(g)), or None for plain linear attention (alpha = 1).
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
    check_chunk_inputs(q, k, v, None, g, initial_state, cu_seqlens, has_beta=False)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht, *_ = torch.ops.momctl.chunk_gated_rule_fwd(q, k, v, g, initial_state, cu_seqlens, scale,
                                                       bool(output_final_state), bool(use_qk_l2norm))
    return o, ht if output_final_state else None
