"""The MoM memory step of exported graphs, on ONNX Runtime's fused ops (`ort_ops.py`): one conv node, one gate node
and one `LinearAttention` node for all slots of a layer, where the standard-op step (`mom_step_ref`) takes about a
hundred nodes.

Every slot goes through the ops; a slot the token does not reach gets decay 0 and beta 0 (k 0 for rules without
beta), so `LinearAttention` leaves its memory bit for bit, and its conv window is put back by one select. The state
keeps the graph's layouts: memories transposed, `[B, S*H*V, K, 1]` (each value column of each head is one
`LinearAttention` head of value width 1 that reads its head's q and k: ONNX Runtime's decode kernel then reads the
state coalesced), conv windows `[B, S*C, W-1]` (slot-major channels).

Legend: B batch, P packed projection columns, E routed memories, S slots, H heads, K key dim, V value dim,
C conv channels of one slot (q | k | v), W filter width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.common.naive_step import routing_weights
from .ort_ops import causal_conv_silu, decay_gate, linear_attention


def mom_step_ort(proj: Tensor, columns, conv_weights: tuple[Tensor, Tensor, Tensor], A_log: Tensor | None,
                 dt_bias: Tensor | None, memory: Tensor, conv: Tensor, *, num_memories: int, top_k: int, delta: bool,
                 conv_every_slot: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`mom_step_ref`'s function with the memories `[B, S*H*V, K, 1]` and the conv windows `[B, S*C, W-1]`:
    returns the slots' weighted outputs `[B, S, H, V]` (0 for untouched slots), the new memories and the new
    windows."""
    B, SC = conv.shape[:2]
    K = memory.shape[2]
    q_weight, k_weight, v_weight = conv_weights
    S = SC // (q_weight.shape[0] + k_weight.shape[0] + v_weight.shape[0])
    HK, HV = q_weight.shape[0], v_weight.shape[0]
    H = HK // K
    V, SH = HV // H, S * H
    x = proj.to(torch.promote_types(proj.dtype, torch.float32))
    weight_BS, touched_BS = routing_weights(x, columns, num_memories, top_k, S)

    def block(start: int, width: int) -> Tensor:
        """Columns start .. start + S * width as `[B, S, width]`."""
        return x[:, start:start + S * width].reshape(B, S, width)

    u_BSC = torch.cat([x[:, None, columns.q:columns.q + HK].expand(B, S, HK), block(columns.k, HK),
                       block(columns.v, HV)], dim=-1)
    w_C1W = torch.cat(list(conv_weights)).to(x.dtype).repeat(S, 1, 1)
    y, moved = causal_conv_silu(u_BSC.reshape(B, SC, 1), w_C1W, conv)
    new_conv = moved if conv_every_slot else torch.where(touched_BS.repeat_interleave(SC // S, dim=1)[..., None],
                                                         moved, conv)

    y = y.reshape(B, S, -1)
    qk = y[..., :2 * HK].reshape(B, S, 2 * H, K)
    # x / sqrt(|x|^2 + 1e-6) written as an RMS norm with weight K^-0.5: ONNX Runtime fuses it into one node
    qk = qk / torch.sqrt(qk.square().mean(-1, keepdim=True) + 1e-6 / K) * qk.new_full((K,), K ** -0.5)
    q, k = qk.reshape(B, S, 2, HK).unbind(2)
    v = y[..., 2 * HK:]
    touched = touched_BS[..., None]

    def per_column(x_BSH: Tensor) -> Tensor:
        """`[B, S, H]` -> `[B, 1, S*H*V]`: the value for each of a head's value columns (the memories' heads)."""
        return x_BSH[..., None].expand(B, S, H, V).reshape(B, 1, SH * V)

    a_B1N = block(columns.a, H).reshape(B, 1, SH) if A_log is not None else None
    b_B1N = block(columns.b, H).reshape(B, 1, SH) if delta else None
    decay = beta = None
    if A_log is not None:
        decay_scale, dt_bias = -A_log.to(x.dtype).exp().repeat(S), dt_bias.to(x.dtype).repeat(S)
        if delta:
            decay, beta = decay_gate(a_B1N, dt_bias, decay_scale, b_B1N)
        else:
            decay = decay_scale * F.softplus(a_B1N + dt_bias)
        decay = per_column(torch.where(touched, decay.reshape(B, S, H), 0))
    if delta:
        beta = b_B1N.sigmoid() if beta is None else beta
        beta = per_column(torch.where(touched, beta.reshape(B, S, H), 0))
    else:
        k = torch.where(touched, k, 0)
    rule = {(False, False): "linear", (True, False): "gated", (False, True): "delta", (True, True): "gated_delta"}
    o, new_memory = linear_attention(q.reshape(B, 1, S * HK), k.reshape(B, 1, S * HK), v.reshape(B, 1, S * HV),
                                     memory, decay, beta, rule[A_log is not None, delta])
    return o.reshape(B, S, H, V) * weight_BS[..., None, None], new_memory, new_conv

