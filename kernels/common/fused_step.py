"""One decode step of every update rule on a slot-indexed state, fused into one Triton launch, out of place.

A MoM layer keeps S slot states per sequence and each token touches A of them (its top-k memories and the shared
one). One launch reads every slot once: a touched slot is advanced (q/k L2 norm, decay, delta correction, output),
an untouched one is copied, and the result goes to a new buffer. Writing a new buffer rather than updating in
place is what makes the step safe to capture in a CUDA graph with ping-pong state buffers. The math and the
reference are in `naive_step.py`.
"""
# Shapes: B batch, A touched slots per row, S slots, H heads, K key dim, V value dim.
# No `from __future__ import annotations`: torch.library reads the custom op's signature from real annotations.

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRETED

MAX_K = 256
MAX_TOUCHED = 8
# Value columns per program: a [K, BV] fp32 state block is at most 256 x 32 (32 KiB over 4 warps).
BV = 32


@triton.jit
def fused_step_fwd_kernel(q, k, v, beta, g, slots, state, new_state, o, scale, S, H: tl.constexpr, K: tl.constexpr,
                          V: tl.constexpr, A: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DELTA: tl.constexpr,
                          USE_G: tl.constexpr, L2NORM: tl.constexpr):
    """Grid (B * S * H, V-blocks): state block [K, BV] of (b, s, h), advanced when s is one of row b's slots."""
    i_bsh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_h = i_bsh % H
    i_s = (i_bsh // H) % S
    i_b = i_bsh // (H * S)
    # which of the row's A slots is s (-1: untouched)
    i_a = -1
    for j in tl.static_range(A):
        i_a = tl.where(tl.load(slots + i_b * A + j) == i_s, j, i_a)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_bsh * K + o_k[:, None]) * V + o_v[None, :]
    b_S = tl.load(state + p_state, mask=m_kv, other=0.0).to(tl.float32)  # [BK, BV]
    if i_a >= 0:
        i_row = (i_b * A + i_a) * H + i_h  # row of (b, a, h) in q, k, v, beta, g
        b_q = tl.load(q + i_row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + i_row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 0) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + 1e-6)
        if USE_G:
            b_S = b_S * tl.exp(tl.load(g + i_row).to(tl.float32))
        b_u = b_v
        if DELTA:
            b_u = tl.load(beta + i_row).to(tl.float32) * (b_v - tl.sum(b_k[:, None] * b_S, 0))
        b_S = b_S + b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_q[:, None] * b_S, 0) * scale
        tl.store(o + i_row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(new_state + p_state, b_S.to(new_state.dtype.element_ty), mask=m_kv)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("momctl::fused_recurrent_step", mutates_args=())
def _step_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, g: Tensor | None, state: Tensor, slots: Tensor,
             delta: bool, scale: float, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    B, A, H, K = q.shape
    S, V = state.shape[1], v.shape[-1]
    o = _empty(v.shape, v.dtype, v.device)
    new_state = _empty(state.shape, state.dtype, state.device)
    if B * S * H == 0:
        return o, new_state
    fused_step_fwd_kernel[(B * S * H, triton.cdiv(V, BV))](
        q, k, v, beta, g, slots, state, new_state, o, scale, S, H=H, K=K, V=V, A=A,
        BK=max(16, triton.next_power_of_2(K)), BV=BV, DELTA=delta, USE_G=g is not None, L2NORM=use_qk_l2norm,
        num_warps=4)
    return o, new_state


@_step_op.register_fake
def _(q, k, v, beta, g, state, slots, delta, scale, use_qk_l2norm):
    return v.new_empty(v.shape), state.new_empty(state.shape)


def fused_recurrent_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    g: Tensor | None,
    state: Tensor,
    slots: Tensor,
    *,
    delta: bool,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """One token per row through `slots [B, A]` of `state [B, S, H, K, V]`; same result as `recurrent_step_ref`.

    Forward only (decoding), no host synchronisation, one launch; a torch.library custom op
    (`momctl::fused_recurrent_step`), so torch.compile and CUDA graphs take it.

    Args:
        q, k: `[B, A, H, K]` (K <= 256), v: `[B, A, H, V]`: the token's projections for each touched slot.
        beta: `[B, A, H]` write strengths (used when `delta`), g: `[B, A, H]` log decays or None (no decay).
        state: `[B, S, H, K, V]` fp32 slot states (read only).
        slots: `[B, A]` integer slot of each touched copy; distinct within a row.
        delta: the delta rule's correction (`gated_delta`, `delta`) or a plain outer-product write (`gated`,
            `linear`).
        scale: output scale, default K ** -0.5.
        use_qk_l2norm: l2-normalise q and k first: x / sqrt(|x|^2 + 1e-6).

    Returns:
        o `[B, A, H, V]` in v.dtype and a new state tensor like `state`: the touched slots advanced, the others
        copied.
    """
    B, A, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or tuple(slots.shape) != (B, A):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and slots {tuple(slots.shape)} "
                         "must be [B, A, H, K], [B, A, H, K], [B, A, H, V] and [B, A]")
    if state.dim() != 5 or state.shape[0] != B or state.shape[2:] != (H, K, v.shape[-1]):
        raise ValueError(f"state must be [B, S, H, K, V] = [{B}, S, {H}, {K}, {v.shape[-1]}], got {tuple(state.shape)}")
    if K > MAX_K or A > MAX_TOUCHED or state.dtype != torch.float32:
        raise ValueError(f"needs K <= {MAX_K}, A <= {MAX_TOUCHED} and an fp32 state; got K={K}, A={A}, {state.dtype}")
    if delta and beta is None:
        raise ValueError("the delta rule needs beta")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the fused step runs on CUDA tensors (or under TRITON_INTERPRET=1), got {q.device}; "
                         "use recurrent_step_ref on the CPU")
    scale = K ** -0.5 if scale is None else float(scale)
    q, k, v, state, slots = (x.contiguous() for x in (q, k, v, state, slots))
    beta = beta.contiguous() if delta else None
    g = None if g is None else g.contiguous()
    return torch.ops.momctl.fused_recurrent_step(q, k, v, beta, g, state, slots, bool(delta), scale,
                                                  bool(use_qk_l2norm))
