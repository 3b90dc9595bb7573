"""One decode step of a MoM layer's memories, fused into one Triton launch (out of place, or memories in place).

Input: the token's packed input projections (one matmul of x: router logits, q, every slot's k, v, beta and decay
pre-activations), the slot-indexed memory and conv-window states. One launch does, for every (row, slot, head,
value block): the top-k routing from the router logits, the short conv + SiLU of q, k, v from the conv window,
q/k L2 norm, beta = sigmoid(b), the decay g = -exp(A_log) softplus(a + dt_bias), one step of the update rule and the
output scaled by the slot's mixing weight; it writes the advanced state of a touched slot and copies an untouched
one into NEW buffers. Writing new buffers, not the input, is what makes the step safe to capture in a CUDA graph
with ping-pong state. The variant the compiled step uses advances the memories IN PLACE (each program owns its
[K, BV] state block, so a block is read before it is written and by nobody else): an untouched slot is then neither
read nor written, which saves the copy traffic of ping-pong, while the conv windows (read by every value block of a
head) still go to a new buffer. The math and the reference are in `naive_step.py`.
"""
# Shapes: B batch, P packed projection columns, E routed memories, S slots (E + shared), H heads, K key dim,
# V value dim, R conv window (conv width - 1), C conv channels (q | k | v = 2 H K + H V).
# No `from __future__ import annotations`: torch.library reads the custom op's signature from real annotations.

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRETED

MAX_K = 256
# Value columns per program: a [K, BV] fp32 state block is at most 256 x 32 (32 KiB over NUM_WARPS warps).
BV = 32
NUM_WARPS = 4


@dataclass(frozen=True)
class StepColumns:
    """Where each input sits in a packed projection row: first column of each block (-1: absent).

    gate: E router logits; q: H K; k: S blocks of H K; v: S blocks of H V; b: S blocks of H (beta before the
    sigmoid); a: S blocks of H (decay before the softplus).
    """

    gate: int
    q: int
    k: int
    v: int
    b: int
    a: int


@triton.jit
def _conv_silu(proj_row, col, win, w, o_w, o_c, m_c, C, R: tl.constexpr):
    """SiLU(sum_j w_j x_j) over the window's R inputs, then the new one, for window channels `o_c` (filter rows
    `o_w`). Returns y and the new input x."""
    b_u = tl.load(proj_row + col, mask=m_c, other=0.0).to(tl.float32)
    b_y = tl.load(w + o_w * (R + 1) + R, mask=m_c, other=0.0).to(tl.float32) * b_u
    for j in tl.static_range(R):
        b_y += (tl.load(w + o_w * (R + 1) + j, mask=m_c, other=0.0).to(tl.float32)
                * tl.load(win + j * C + o_c, mask=m_c, other=0.0))
    return b_y * tl.sigmoid(b_y), b_u


@triton.jit
def _shift_window(win, new_win, o_c, m_c, b_u, C, R: tl.constexpr, advance):
    """The new conv window of channels `o_c`: the last R inputs (`b_u` appended) when `advance`, else a copy."""
    for j in tl.static_range(R):
        if advance:
            if j == R - 1:
                b_x = b_u
            else:
                b_x = tl.load(win + (j + 1) * C + o_c, mask=m_c, other=0.0)
        else:
            b_x = tl.load(win + j * C + o_c, mask=m_c, other=0.0)
        tl.store(new_win + j * C + o_c, b_x, mask=m_c)


@triton.jit
def fused_mom_step_kernel(
    proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, new_memory, new_conv, o,
    P, col_gate, col_q, col_k, col_v, col_b, col_a, scale,
    E: tl.constexpr, S: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, R: tl.constexpr,
    TOP_K: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DELTA: tl.constexpr,
    USE_G: tl.constexpr, CONV_EVERY_SLOT: tl.constexpr, IN_PLACE: tl.constexpr,
):
    """Grid (B * S * H, V-blocks): state block [K, BV] of (b, s, h), advanced when row b's token reaches slot s
    (IN_PLACE: `new_memory` is `memory`, and an untouched block is left as it is)."""
    i_bsh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_h = i_bsh % H
    i_s = (i_bsh // H) % S
    i_b = i_bsh // (H * S)
    proj_row = proj + i_b * P
    HK = H * K
    C = 2 * HK + H * V

    # Routing: a memory is touched when it is among the top k (the lower index first among ties), with its
    # softmax probability renormalised over the top k as weight; the shared memory (s = E) always, with weight 1.
    if E > 1:
        o_e = tl.arange(0, BE)
        m_e = o_e < E
        b_l = tl.load(proj_row + col_gate + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
        ahead = (b_l[None, :] > b_l[:, None]) | ((b_l[None, :] == b_l[:, None]) & (o_e[None, :] < o_e[:, None]))
        rank = tl.sum((ahead & m_e[None, :]).to(tl.int32), 1)
        chosen = (rank < TOP_K) & m_e
        b_p = tl.where(chosen, tl.exp(b_l - tl.max(b_l, 0)), 0.0)
        is_me = o_e == i_s
        touched = (tl.sum((is_me & chosen).to(tl.int32), 0) > 0) | (i_s >= E)
        w = tl.where(i_s >= E, 1.0, tl.sum(tl.where(is_me, b_p, 0.0), 0) / tl.sum(b_p, 0))
    else:
        touched = i_s >= 0
        w = 1.0
    if CONV_EVERY_SLOT:
        advance = i_s >= 0
    else:
        advance = touched

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    win = conv + (i_b * S + i_s) * R * C
    new_win = new_conv + (i_b * S + i_s) * R * C

    # This program's conv channels: the head's v block, and (first v block only) the head's q and k channels.
    o_hv, o_hk = i_h * V + o_v, i_h * K + o_k
    b_yv, b_uv = _conv_silu(proj_row, col_v + i_s * H * V + o_hv, win, conv_v, o_hv, 2 * HK + o_hv, m_v, C, R)
    b_yq, b_uq = _conv_silu(proj_row, col_q + o_hk, win, conv_q, o_hk, o_hk, m_k, C, R)
    b_yk, b_uk = _conv_silu(proj_row, col_k + i_s * HK + o_hk, win, conv_k, o_hk, HK + o_hk, m_k, C, R)
    _shift_window(win, new_win, 2 * HK + o_hv, m_v, b_uv, C, R, advance)
    if i_v == 0:
        _shift_window(win, new_win, o_hk, m_k, b_uq, C, R, advance)
        _shift_window(win, new_win, HK + o_hk, m_k, b_uk, C, R, advance)

    p_state = (i_bsh * K + o_k[:, None]) * V + o_v[None, :]
    b_o = tl.zeros([BV], dtype=tl.float32)
    if touched:
        b_S = tl.load(memory + p_state, mask=m_kv, other=0.0)  # [BK, BV]
        b_q = b_yq / tl.sqrt(tl.sum(b_yq * b_yq, 0) + 1e-6)
        b_k = b_yk / tl.sqrt(tl.sum(b_yk * b_yk, 0) + 1e-6)
        if USE_G:
            b_a = tl.load(proj_row + col_a + i_s * H + i_h).to(tl.float32) + tl.load(dt_bias + i_h).to(tl.float32)
            softplus = tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(b_a)))
            b_S = b_S * tl.exp(-tl.exp(tl.load(A_log + i_h).to(tl.float32)) * softplus)
        b_u = b_yv
        if DELTA:
            beta = tl.sigmoid(tl.load(proj_row + col_b + i_s * H + i_h).to(tl.float32))
            b_u = beta * (b_yv - tl.sum(b_k[:, None] * b_S, 0))
        b_S = b_S + b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_q[:, None] * b_S, 0) * (scale * w)
        tl.store(new_memory + p_state, b_S, mask=m_kv)
    elif not IN_PLACE:
        tl.store(new_memory + p_state, tl.load(memory + p_state, mask=m_kv, other=0.0), mask=m_kv)
    tl.store(o + i_bsh * V + o_v, b_o, mask=m_v)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, cols, num_memories, top_k, delta,
            conv_every_slot, scale, new_memory, new_conv, in_place=False) -> Tensor:
    B, S, H, K, V = memory.shape
    o = _empty((B, S, H, V), torch.float32, proj.device)
    if B == 0:
        return o
    fused_mom_step_kernel[(B * S * H, triton.cdiv(V, BV))](
        proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, new_memory, new_conv, o, proj.shape[1], *cols,
        scale, E=num_memories, S=S, H=H, K=K, V=V, R=conv.shape[2], TOP_K=top_k,
        BE=max(2, triton.next_power_of_2(num_memories)), BK=max(16, triton.next_power_of_2(K)), BV=BV, DELTA=delta,
        USE_G=A_log is not None, CONV_EVERY_SLOT=conv_every_slot, IN_PLACE=in_place, num_warps=NUM_WARPS)
    return o


@torch.library.custom_op("momctl::fused_mom_step", mutates_args=())
def _step_op(proj: Tensor, conv_q: Tensor, conv_k: Tensor, conv_v: Tensor, A_log: Tensor | None,
             dt_bias: Tensor | None, memory: Tensor, conv: Tensor, cols: list[int], num_memories: int, top_k: int,
             delta: bool, conv_every_slot: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    new_memory = _empty(memory.shape, torch.float32, proj.device)
    new_conv = _empty(conv.shape, torch.float32, proj.device)
    o = _launch(proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, cols, num_memories, top_k, delta,
                conv_every_slot, scale, new_memory, new_conv)
    return o, new_memory, new_conv


@_step_op.register_fake
def _(proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, cols, num_memories, top_k, delta, conv_every_slot,
      scale):
    B, S, H, _, V = memory.shape
    return (proj.new_empty((B, S, H, V), dtype=torch.float32), memory.new_empty(memory.shape),
            conv.new_empty(conv.shape))


@torch.library.custom_op("momctl::fused_mom_step_in_place", mutates_args=("memory", "new_conv"))
def _step_in_place_op(proj: Tensor, conv_q: Tensor, conv_k: Tensor, conv_v: Tensor, A_log: Tensor | None,
                      dt_bias: Tensor | None, memory: Tensor, conv: Tensor, cols: list[int], num_memories: int,
                      top_k: int, delta: bool, conv_every_slot: bool, scale: float, new_conv: Tensor) -> Tensor:
    return _launch(proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, cols, num_memories, top_k, delta,
                   conv_every_slot, scale, memory, new_conv, in_place=True)


@_step_in_place_op.register_fake
def _(proj, conv_q, conv_k, conv_v, A_log, dt_bias, memory, conv, cols, num_memories, top_k, delta, conv_every_slot,
      scale, new_conv):
    B, S, H, _, V = memory.shape
    return proj.new_empty((B, S, H, V), dtype=torch.float32)


def fused_mom_step(
    proj: Tensor,
    columns: StepColumns,
    conv_weights: tuple[Tensor, Tensor, Tensor],
    A_log: Tensor | None,
    dt_bias: Tensor | None,
    memory: Tensor,
    conv: Tensor,
    *,
    num_memories: int,
    top_k: int,
    delta: bool,
    conv_every_slot: bool = False,
    scale: float | None = None,
    conv_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token per row through a MoM layer's memories; same result as `mom_step_ref`.

    Forward only (decoding), no host synchronisation, one launch; a torch.library custom op
    (`momctl::fused_mom_step`), so torch.compile and CUDA graphs take it.

    Args:
        proj: `[B, P]` the token's packed input projections, laid out as `columns` says.
        columns: the first column of each block of `proj`.
        conv_weights: the q, k and v conv filters `[H K, W]`, `[H K, W]`, `[H V, W]` (W = R + 1).
        A_log, dt_bias: `[H]` the decay parameters, or None for the rules without decay.
        memory: `[B, S, H, K, V]` fp32 slot memories (K <= 256); read only, unless `conv_out` is given.
        conv: `[B, S, R, C]` fp32 conv windows (the last R inputs of q | k | v per slot); read only.
        num_memories: E routed memories (S = E + 1 with the shared memory, else E); 1 means no router.
        top_k: memories each token reaches (ignored when E = 1).
        delta: the delta rule's correction (`gated_delta`, `delta`) or a plain outer-product write.
        conv_every_slot: every slot's conv window takes the token (conv_scope `time`), not just the touched ones.
        scale: output scale, default K ** -0.5.
        conv_out: a contiguous fp32 buffer like `conv` (not `conv` itself: the windows ping-pong with another
            buffer) to write the new windows into; then `memory` (contiguous) is advanced in place: the touched
            slots written, the others neither read nor written. None: new tensors for both.

    Returns:
        o `[B, S, H, V]` fp32 (each slot's output times its mixing weight; zero for a slot not reached: the layer's
        output is the sum over S), and the new memory and conv tensors (`memory` and `conv_out` when given): the
        touched slots advanced, the others as they were.
    """
    B, S, H, K, V = memory.shape
    R = conv.shape[2]
    C = 2 * H * K + H * V
    conv_q, conv_k, conv_v = (w.reshape(w.shape[0], -1) for w in conv_weights)
    if proj.dim() != 2 or proj.shape[0] != B or tuple(conv.shape) != (B, S, R, C):
        raise ValueError(f"proj {tuple(proj.shape)} and conv {tuple(conv.shape)} must be [B, P] and "
                         f"[B, S, R, C] = [{B}, {S}, R, {C}] for memory {tuple(memory.shape)}")
    if (conv_q.shape, conv_k.shape, conv_v.shape) != ((H * K, R + 1), (H * K, R + 1), (H * V, R + 1)):
        raise ValueError(f"the conv filters must be [{H * K}, {R + 1}], [{H * K}, {R + 1}] and [{H * V}, {R + 1}]")
    if K > MAX_K or memory.dtype != torch.float32 or conv.dtype != torch.float32:
        raise ValueError(f"needs K <= {MAX_K} and fp32 memory and conv states; got K={K}, {memory.dtype}, "
                         f"{conv.dtype}")
    if not 1 <= num_memories <= S or (num_memories > 1 and not 1 <= top_k <= num_memories):
        raise ValueError(f"num_memories {num_memories} and top_k {top_k} do not fit {S} slots")
    if (A_log is None) != (dt_bias is None) or (delta and columns.b < 0) or (A_log is not None and columns.a < 0):
        raise ValueError("the rule's inputs are missing: the delta rule needs beta columns, decay needs A_log, "
                         "dt_bias and decay columns")
    if proj.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the fused step runs on CUDA tensors (or under TRITON_INTERPRET=1), got {proj.device}; "
                         "use mom_step_ref on the CPU")
    scale = K ** -0.5 if scale is None else float(scale)
    if conv_out is not None and (conv_out.shape != conv.shape or conv_out is conv or conv_out.dtype != torch.float32
                                 or not (conv_out.is_contiguous() and memory.is_contiguous())):
        raise ValueError("conv_out must be a contiguous fp32 buffer shaped like conv, not conv itself, and memory "
                         "(advanced in place) contiguous")
    cols = [columns.gate, columns.q, columns.k, columns.v, columns.b, columns.a]
    args = (proj.contiguous(), conv_q.contiguous(), conv_k.contiguous(), conv_v.contiguous(), A_log, dt_bias,
            memory.contiguous(), conv.contiguous(), cols, num_memories, top_k if num_memories > 1 else 1,
            bool(delta), bool(conv_every_slot), scale)
    if conv_out is None:
        return torch.ops.momctl.fused_mom_step(*args)
    return torch.ops.momctl.fused_mom_step_in_place(*args, conv_out), memory, conv_out
