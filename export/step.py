"""The static recurrent step: one token per sequence through the whole model with fixed shapes.

No host synchronisation and no branching on tensor values. A MoM layer computes all its input projections with one
matmul (packed weights, export/step_weights.py); routing, the conv windows and the update rule then run for every slot
at once, and a slot the token does not reach is copied unchanged (no decay; its conv window does not move unless
conv_scope is `time`). The new state is written to NEW tensors, never into the input state, so a captured graph
can ping-pong between two state buffers; or, given an `out` state, the memories are advanced in place (they are
shared by both buffers) and only the conv windows and positions ping-pong. Attention layers write the new
key/value at the sequence's position of a preallocated cache (out of place) and mask the positions past it.

Legend: B batch, D d_model, W vocabulary, S slots (E routed memories + the shared one), H heads, V value head dim,
P packed projection columns, I MLP hidden size, h attention heads, d attention head dim, L KV-cache capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention, rotate
from ..backend import use_kernels
from ..kernels.common.naive_step import mom_step_ref
from ..mixer import MoMMixer
from ..modules import SwiGLU
from ..state import KVCache, MemoryState, StepState
from .step_weights import mixer_linears, mlp_linears, packed_weight


def decode_step(model: nn.Module, token_ids_B: torch.Tensor, state: StepState,
                out: StepState | None = None, memory_step=None, add_norm=None) -> tuple[torch.Tensor, StepState]:
    """One token per sequence: `MoMForCausalLM` at the next position of each sequence.

    Args:
        model: a `MoMForCausalLM`.
        token_ids_B: the next token of each sequence `[B]` (int64).
        state: the state before it (`StepState.from_inference(prefill_state)`); not modified, except that with
            `out` the new key/value of attention layers is written into its KV caches (past the valid entries).
        out: a state of the same layout to write the new state into (the other buffer of a ping-pong pair, never
            `state` itself); its attention layers must hold the same KV-cache tensors as `state`'s (the cache is
            appended in place, not double-buffered), and its MoM layers the same memory tensors (advanced in place;
            their conv windows are other tensors). None: new tensors.
        memory_step: the memories' step of MoM layers, for exported graphs (`ort_step.mom_step_ort`, which takes
            the state in the graph's layouts and the layer's output norm, and returns the slots' outputs already
            mixed and normalised; without `out`). None: the fused kernel on CUDA, `mom_step_ref` elsewhere.
        add_norm: `(x, y, norm) -> (norm(x + y), x + y)`, the residual add with the norm after it, for exported
            graphs (`ort_step.ort_add_norm`: one fused node). None: the two in PyTorch.

    Returns:
        logits `[B, W]` and the state after the token (`cache_length` one higher). The KV caches must have room for
        the token: the caller keeps `state.cache_length < state.capacity` (`MoMForCausalLM.step` does).
    """
    add_norm = add_norm or _add_then_norm
    x_BD = model.model.embeddings(token_ids_B)
    y_BD = None  # the last sublayer's output: added to the residual stream x by the next norm
    layers = []
    for i, (block, layer_state) in enumerate(zip(model.model.layers, state.layers, strict=True)):
        h_BD, x_BD = (block.attn_norm(x_BD), x_BD) if y_BD is None else add_norm(x_BD, y_BD, block.attn_norm)
        if isinstance(block.attn, Attention):
            y_BD, layer_state = attention_step(block.attn, h_BD, state.positions, layer_state, out is not None)
        else:
            y_BD, layer_state = mom_step(block.attn, h_BD, layer_state, None if out is None else out.layers[i],
                                         memory_step)
        layers.append(layer_state)
        h_BD, x_BD = add_norm(x_BD, y_BD, block.mlp_norm)
        y_BD = mlp_step(block.mlp, h_BD)
    h_BD, _ = add_norm(x_BD, y_BD, model.model.norm)
    logits_BW = F.linear(h_BD, model.output_weight.to(h_BD.dtype))
    positions = state.positions + 1 if out is None else torch.add(state.positions, 1, out=out.positions)
    cache_length = state.cache_length + 1 if state.capacity is not None else 0
    return logits_BW, StepState(layers=layers, positions=positions, cache_length=cache_length)


def _add_then_norm(x_BD: torch.Tensor, y_BD: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream x + y and its norm: returns (norm(x + y), x + y)."""
    x_BD = x_BD + y_BD
    return norm(x_BD), x_BD


def mom_step(mixer: MoMMixer, x_BD: torch.Tensor, state: MemoryState, out: MemoryState | None = None,
             memory_step=None) -> tuple[torch.Tensor, MemoryState]:
    """One token through a MoM layer (shared/mom-spec.md steps 1-8 for T = 1). Returns y `[B, D]` and the new state:
    new tensors, or (with `out`, which holds the same memory tensor as `state`) the memories advanced in place and
    the conv windows written into `out.conv`.

    One matmul gives every input projection (router logits, q, each slot's k, v, beta and decay inputs, and the
    output gate); the memories' step (routing, conv, update rule, weighted outputs) is one fused Triton launch on
    CUDA (`kernels/common/fused_step.py`) and its reference elsewhere, which computes every slot and keeps the
    touched ones; or `memory_step` (see `decode_step`).
    """
    if out is not None and out.memory is not state.memory:
        raise ValueError("out must hold the state's own memory tensor: the memories are advanced in place")
    c = mixer.config
    B, _ = x_BD.shape
    H, V = c.num_heads, c.head_v_dim
    linears, columns = mixer_linears(mixer)
    weight = packed_weight(mixer, linears)
    if weight is None:  # traced without a pack: the same columns, one matmul per projection
        proj_BP = torch.cat([linear(x_BD) for linear in linears], dim=-1)
    else:
        proj_BP = F.linear(x_BD, weight.to(x_BD.dtype))
    conv_weights = (mixer.q_conv1d.weight, mixer.k_conv1d.weight, mixer.v_conv1d.weight)
    A_log, dt_bias = (mixer.A_log, mixer.dt_bias) if c.has_decay else (None, None)
    options = dict(num_memories=c.num_memories, top_k=c.top_k, delta=c.has_beta,
                   conv_every_slot=c.conv_scope == "time")
    if memory_step is not None:  # exported graphs: the output comes back mixed and normalised
        o_BHV, memory, conv = memory_step(proj_BP, columns, conv_weights, A_log, dt_bias, state.memory, state.conv,
                                          mixer.o_norm, **options)
    else:
        step = mom_step_ref
        if use_kernels(x_BD):
            from ..kernels.common.fused_step import fused_mom_step as step
        o_BSHV, memory, conv = step(proj_BP, columns, conv_weights, A_log, dt_bias, state.memory, state.conv,
                                    **options, conv_out=None if out is None else out.conv)
        o_BHV = o_BSHV.sum(1).to(x_BD.dtype)  # 6. Mix: the step weighted each slot's output; untouched slots are 0
        # The output gate is the last projection (the pack's zero padding follows it).
        gate_start = sum(linear.out_features for linear in linears) - c.value_dim
        gate_BHV = proj_BP[:, gate_start:gate_start + c.value_dim]
        o_BHV = mixer.o_norm(o_BHV, gate_BHV.reshape(B, H, V))  # 7. Gated norm

    # 8. Output projection.
    o_BHV = o_BHV.to(x_BD.dtype)
    return mixer.o_proj(o_BHV.reshape(B, c.value_dim)), MemoryState(memory=memory, conv=conv)


def mlp_step(mlp: SwiGLU, x_BD: torch.Tensor) -> torch.Tensor:
    """The block's SwiGLU with its gate and up projections as one matmul."""
    weight = packed_weight(mlp, mlp_linears(mlp))
    if weight is None:
        return mlp(x_BD)
    I = mlp.up_proj.out_features
    proj_BP = F.linear(x_BD, weight.to(x_BD.dtype))
    padding = proj_BP.shape[-1] - 2 * I  # one Split in exported graphs (slicing would be two Slices, two launches)
    gate_BI, up_BI = proj_BP.split([I, I, padding] if padding else [I, I], dim=-1)[:2]
    return mlp.down_proj(F.silu(gate_BI) * up_BI)


def attention_step(attn: Attention, x_BD: torch.Tensor, positions_B: torch.Tensor, cache: KVCache,
                   in_place: bool = False) -> tuple[torch.Tensor, KVCache]:
    """One token through an attention layer at `positions_B`: RoPE, the key/value written at that position of new
    cache tensors (of `cache` itself when `in_place`), SDPA over the positions up to it. Returns y `[B, D]` and the
    new cache."""
    B, D = x_BD.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    L = cache.keys.shape[2]
    positions_B1 = positions_B[:, None]
    q = rotate(attn.q_proj(x_BD).view(B, 1, h, d).transpose(1, 2), positions_B1, attn.config.rope_theta)
    k = rotate(attn.k_proj(x_BD).view(B, 1, hkv, d).transpose(1, 2), positions_B1, attn.config.rope_theta)
    v = attn.v_proj(x_BD).view(B, 1, hkv, d).transpose(1, 2)
    index = positions_B.reshape(B, 1, 1, 1).expand(B, hkv, 1, d)
    write = torch.Tensor.scatter_ if in_place else torch.Tensor.scatter
    keys = write(cache.keys, 2, index, k.to(cache.keys.dtype))
    values = write(cache.values, 2, index, v.to(cache.values.dtype))
    k, v = keys.to(q.dtype), values.to(q.dtype)
    if hkv != h:
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    mask_B11L = (torch.arange(L, device=x_BD.device) <= positions_B1)[:, None, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11L)
    return attn.o_proj(o.transpose(1, 2).reshape(B, D)), KVCache(keys, values)
