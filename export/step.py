"""The static recurrent step: one token per sequence through the whole model with fixed shapes.

No host synchronisation and no branching on tensor values: routing picks each token's slots with top-k, their
states are gathered by index, updated by one step of the recurrence and scattered into NEW state tensors (the input
state is never written, so a captured graph can ping-pong between two state buffers). A memory a token does not
reach is untouched: no decay, and its conv window does not move (conv_scope `segment`). Attention layers write the
new key/value at the sequence's position of a preallocated cache (out of place) and mask the positions past it.

Legend: B batch, D d_model, W vocabulary, S slots (E routed memories + the shared one), A slots a token reaches
(top-k + shared), N rows (B * A or B * S), H heads, K key head dim, V value head dim, C conv channels, R conv window
(conv_size - 1), h attention heads, d attention head dim, L KV-cache capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention, rotate
from ..backend import use_kernels
from ..mixer import MoMMixer
from ..modules import at_least_fp32, short_conv
from ..recurrence import memory_step, rule_terms
from ..state import KVCache, MemoryState, StepState


def decode_step(model: nn.Module, token_ids_B: torch.Tensor, state: StepState) -> tuple[torch.Tensor, StepState]:
    """One token per sequence: `MoMForCausalLM` at the next position of each sequence.

    Args:
        model: a `MoMForCausalLM`.
        token_ids_B: the next token of each sequence `[B]` (int64).
        state: the state before it (`StepState.from_inference(prefill_state)`); not modified.

    Returns:
        logits `[B, W]` and the state after the token (new tensors; `cache_length` one higher). The KV caches must
        have room for the token: the caller keeps `state.cache_length < state.capacity` (`MoMForCausalLM.step` does).
    """
    x_BD = model.model.embeddings(token_ids_B)
    layers = []
    for block, layer_state in zip(model.model.layers, state.layers, strict=True):
        h_BD = block.attn_norm(x_BD)
        if isinstance(block.attn, Attention):
            y_BD, layer_state = attention_step(block.attn, h_BD, state.positions, layer_state)
        else:
            y_BD, layer_state = mom_step(block.attn, h_BD, layer_state)
        layers.append(layer_state)
        x_BD = x_BD + y_BD
        x_BD = x_BD + block.mlp(block.mlp_norm(x_BD))
    logits_BW = F.linear(model.model.norm(x_BD), model.output_weight.to(x_BD.dtype))
    cache_length = state.cache_length + 1 if state.capacity is not None else 0
    return logits_BW, StepState(layers=layers, positions=state.positions + 1, cache_length=cache_length)


def mom_step(mixer: MoMMixer, x_BD: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
    """One token through a MoM layer (shared/mom-spec.md steps 1-8 for T = 1). Returns y `[B, D]` and the new state."""
    c = mixer.config
    B, _ = x_BD.shape
    S, H, K, V, R = c.num_slots, c.num_heads, c.head_dim, c.head_v_dim, c.conv_size - 1
    HK, HV, C = c.key_dim, c.value_dim, mixer.conv_channels

    # 1. Each token's A slots (top-k memories, then the shared one) and mixing weights.
    _, slots_B1A, w_B1A = mixer.route(x_BD[:, None])
    slots_BA, w_BA = slots_B1A[:, 0], w_B1A[:, 0]
    A = slots_BA.shape[1]

    def pick(x_BS: torch.Tensor) -> torch.Tensor:
        """`[B, S, *]` -> the token's slots `[B, A, *]`."""
        index = slots_BA.reshape(B, A, *[1] * (x_BS.dim() - 2)).expand(B, A, *x_BS.shape[2:])
        return x_BS.gather(1, index)

    def put(x_BS: torch.Tensor, x_BA: torch.Tensor) -> torch.Tensor:
        """A copy of `x_BS [B, S, *]` with the token's slots replaced by `x_BA [B, A, *]`."""
        index = slots_BA.reshape(B, A, *[1] * (x_BS.dim() - 2)).expand(B, A, *x_BS.shape[2:])
        return x_BS.scatter(1, index, x_BA.to(x_BS.dtype))

    # 3-4. Every slot's projections (one small matmul each); the conv runs on the token's slots only, or on every
    # slot when each slot's conv sees the whole timeline (conv_scope `time`).
    q_BC = mixer.q_proj(x_BD)
    k_BSC, v_BSC = _slot_projection(mixer, "k", x_BD), _slot_projection(mixer, "v", x_BD)
    u_BSC = torch.cat([q_BC[:, None].expand(B, S, HK), k_BSC, v_BSC], dim=-1)
    conv_weight = torch.cat([mixer.q_conv1d.weight, mixer.k_conv1d.weight, mixer.v_conv1d.weight])[:, 0]
    if c.conv_scope == "segment":
        y_NC, window_NRC = _conv_one(pick(u_BSC), conv_weight, pick(state.conv))
        conv_BSRC = put(state.conv, window_NRC.reshape(B, A, R, C))
        y_BAC = y_NC.reshape(B, A, C)
    else:
        y_NC, window_NRC = _conv_one(u_BSC, conv_weight, state.conv)
        conv_BSRC = at_least_fp32(window_NRC.reshape(B, S, R, C))
        y_BAC = pick(y_NC.reshape(B, S, C))
    q_BAC, k_BAC, v_BAC = y_BAC.split([HK, HK, HV], dim=-1)

    # 5. One step of the recurrence for each of the token's slots: on CUDA one fused launch that reads every slot
    # once and writes the new state (kernels/common/fused_step.py), elsewhere gather, step, scatter.
    beta = g = None
    if c.has_beta:
        beta = pick(_slot_projection(mixer, "b", x_BD)).sigmoid()
    if c.has_decay:
        g = mixer._log_decay(pick(_slot_projection(mixer, "a", x_BD)))
    if use_kernels(x_BD):
        from ..kernels.common.fused_step import fused_recurrent_step

        delta, decay = rule_terms(c.update_rule, g)
        o_BAHV, memory_BSHKV = fused_recurrent_step(
            q_BAC.reshape(B, A, H, K), k_BAC.reshape(B, A, H, K), v_BAC.reshape(B, A, H, V), beta if delta else None,
            decay, state.memory, slots_BA, delta=delta)
        o_NHV = o_BAHV.reshape(B * A, H, V)
    else:
        o_NHV, memory_NHKV = memory_step(
            c.update_rule, q_BAC.reshape(B * A, H, K), k_BAC.reshape(B * A, H, K), v_BAC.reshape(B * A, H, V),
            None if beta is None else beta.reshape(B * A, H), None if g is None else g.reshape(B * A, H),
            pick(state.memory).reshape(B * A, H, K, V))
        memory_BSHKV = put(state.memory, memory_NHKV.reshape(B, A, H, K, V))

    # 6-8. Mix by the routing weights (the shared slot has weight 1), gated norm, output projection.
    o_BHV = (o_NHV.reshape(B, A, HV) * w_BA[..., None].to(o_NHV.dtype)).sum(1).reshape(B, H, V)
    o_BHV = mixer.o_norm(o_BHV, mixer.g_proj(x_BD).reshape(B, H, V))
    return mixer.o_proj(o_BHV.reshape(B, HV)), MemoryState(memory=memory_BSHKV, conv=conv_BSRC)


def attention_step(attn: Attention, x_BD: torch.Tensor, positions_B: torch.Tensor,
                   cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """One token through an attention layer at `positions_B`: RoPE, the key/value written at that position of new
    cache tensors, SDPA over the positions up to it. Returns y `[B, D]` and the new cache."""
    B, D = x_BD.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    L = cache.keys.shape[2]
    positions_B1 = positions_B[:, None]
    q = rotate(attn.q_proj(x_BD).view(B, 1, h, d).transpose(1, 2), positions_B1, attn.config.rope_theta)
    k = rotate(attn.k_proj(x_BD).view(B, 1, hkv, d).transpose(1, 2), positions_B1, attn.config.rope_theta)
    v = attn.v_proj(x_BD).view(B, 1, hkv, d).transpose(1, 2)
    index = positions_B.reshape(B, 1, 1, 1).expand(B, hkv, 1, d)
    keys = cache.keys.scatter(2, index, k.to(cache.keys.dtype))
    values = cache.values.scatter(2, index, v.to(cache.values.dtype))
    k, v = keys.to(q.dtype), values.to(q.dtype)
    if hkv != h:
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    mask_B11L = (torch.arange(L, device=x_BD.device) <= positions_B1)[:, None, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11L)
    return attn.o_proj(o.transpose(1, 2).reshape(B, D)), KVCache(keys, values)


def _slot_projection(mixer: MoMMixer, name: str, x_BD: torch.Tensor) -> torch.Tensor:
    """Every slot's own `k`, `v`, `b` or `a` projection of x: `[B, S, C]` (the E memories, then the shared one)."""
    linears = [*getattr(mixer, f"{name}_proj")]
    if mixer.config.shared_memory:
        linears.append(getattr(mixer, f"shared_{name}"))
    return torch.stack([linear(x_BD) for linear in linears], dim=1)


def _conv_one(u_BXC: torch.Tensor, weight_CW: torch.Tensor, window_BXRC: torch.Tensor):
    """The short conv for one new input per (sequence, slot): u `[B, X, C]`, windows `[B, X, R, C]` -> y `[B*X, C]`
    and the advanced windows `[B*X, R, C]`."""
    B, X, C = u_BXC.shape
    lengths = torch.ones(B * X, dtype=torch.long, device=u_BXC.device)
    y_N1C, window_NRC = short_conv(u_BXC.reshape(B * X, 1, C), weight_CW, window_BXRC.reshape(B * X, -1, C), lengths)
    return y_N1C[:, 0], window_NRC
