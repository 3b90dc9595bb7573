"""The MoM memory step of exported graphs, on ONNX Runtime's fused ops (`ort_ops.py`): one conv node, one gate node
and one `LinearAttention` node for all slots of a layer, where the standard-op step (`mom_step_ref`) takes about a
hundred nodes.

Every slot goes through the ops; a slot the token does not reach gets decay 0 and beta 0 (k 0 for rules without
beta), so `LinearAttention` leaves its memory bit for bit, and its conv window is put back by one select. The state
keeps the graph's layouts: memories transposed, `[B, S*H*V, K, 1]` (each value column of each head is one
`LinearAttention` head of value width 1 that reads its head's q and k: ONNX Runtime's decode kernel then reads the
state coalesced), conv windows `[B, S*C, W-1]` (slot-major channels). `mom_step_ort_cuda` is the same step for
ONNX Runtime's CUDA provider only, with one `GatedDeltaNet` node in place of the norm, gate and `LinearAttention`
nodes (graphs of `--ops onnxruntime-cuda`).

Legend: B batch, P packed projection columns, E routed memories, S slots, H heads, K key dim, V value dim,
C conv channels of one slot (q | k | v), W filter width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ort_ops import (
    add_rms_norm,
    causal_conv_silu,
    decay_gate,
    gated_delta_net,
    gated_rms_norm,
    greater_or_equal,
    linear_attention,
)

# (has decay, has beta) -> ONNX Runtime's update rule
RULES = {(False, False): "linear", (True, False): "gated", (False, True): "delta", (True, True): "gated_delta"}


def mom_step_ort(proj: Tensor, columns, conv_weights: tuple[Tensor, Tensor, Tensor], A_log: Tensor | None,
                 dt_bias: Tensor | None, memory: Tensor, conv: Tensor, o_norm: torch.nn.Module, *, num_memories: int,
                 top_k: int, delta: bool, conv_every_slot: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`mom_step_ref`'s function with the memories `[B, S*H*V, K, 1]` and the conv windows `[B, S*C, W-1]`, and the
    layer's gated output norm `o_norm` after it: returns the normalised output `[B, H, V]` in at least fp32, the new
    memories and the new windows.

    Written for few nodes (each is a kernel launch at decode time): Splits cut the projection row into its
    blocks; the gates' inputs are masked to -inf (softplus and sigmoid of -inf are 0: no decay, beta 0) by one
    select that also broadcasts them to one value per memory column; the slots are mixed by one matmul, and the
    gated norm is one node (ONNX Runtime's GatedRMSNorm) that takes the mixed output and the gate in fp32."""
    B, SC = conv.shape[:2]
    K = memory.shape[2]
    q_weight, k_weight, v_weight = conv_weights
    HK, HV = q_weight.shape[0], v_weight.shape[0]
    S = SC // (2 * HK + HV)
    H = HK // K
    V = HV // H
    x = proj.to(torch.promote_types(proj.dtype, torch.float32))
    blocks = _split_blocks(x, columns, num_memories, S, H, HK, HV, alone=(("k",), ("v",)))
    weight_BS, touched_BS = _routing(blocks.get("gate"), num_memories, top_k, S, x)

    q_BSK = blocks["q"][:, None].expand(B, S, HK)
    u_BSC = torch.cat([q_BSK, blocks["k"].reshape(B, S, HK), blocks["v"].reshape(B, S, HV)], dim=-1)
    w_C1W = torch.cat(list(conv_weights)).to(x.dtype).repeat(S, 1, 1)
    y, moved = causal_conv_silu(u_BSC.reshape(B, SC, 1), w_C1W, conv)
    # the select takes the windows in the graph's layout: reshaping a graph output would copy it
    new_conv = moved if conv_every_slot else torch.where(touched_BS.repeat_interleave(SC // S, dim=1)[..., None],
                                                         moved, conv)

    qk, v = y.reshape(B, S, -1).split([2 * HK, HV], dim=-1)
    qk = qk.reshape(B, S, 2 * H, K)
    # x / sqrt(|x|^2 + 1e-6) written as an RMS norm with weight K^-0.5, which ONNX Runtime fuses into one node. The
    # epsilon is a one-element tensor: the exporter's optimizer drops a scalar Add below 1e-8 as adding zero.
    qk = qk / torch.sqrt(qk.square().mean(-1, keepdim=True) + qk.new_full((1,), 1e-6 / K)) * qk.new_full((K,),
                                                                                                        K ** -0.5)
    q, k = qk.reshape(B, S, 2, HK).unbind(2)
    touched = touched_BS[..., None, None]  # [B, S, 1, 1]: broadcast over heads and value columns
    never = x.new_full((V,), float("-inf"))  # the select's other operand: its result is one value per column
    decay = beta = None
    if delta and A_log is not None:
        b_a = torch.where(touched[:, None], blocks["ba"].reshape(B, 2, S, H, 1), never)
        b_col, a_col = b_a.reshape(B, 2, 1, S * H * V).unbind(1)
        decay, beta = decay_gate(a_col, _per_column(dt_bias, S, V, x.dtype), _per_column(-A_log.exp(), S, V, x.dtype),
                                 b_col)
    elif delta:
        beta = torch.where(touched, blocks["b"].reshape(B, S, H, 1), never).sigmoid().reshape(B, 1, -1)
    elif A_log is not None:
        a = torch.where(touched, blocks["a"].reshape(B, S, H, 1), never).reshape(B, 1, -1)
        decay = _per_column(-A_log.exp(), S, V, x.dtype) * F.softplus(a + _per_column(dt_bias, S, V, x.dtype))
    if not delta:  # no beta to zero: k = 0 leaves the memory (decay 0 too)
        k = torch.where(touched_BS[..., None], k, 0)
    o, new_memory = linear_attention(q.reshape(B, 1, S * HK), k.reshape(B, 1, S * HK), v.reshape(B, 1, S * HV),
                                     memory, decay, beta, RULES[A_log is not None, delta])
    return _mix_and_norm(weight_BS, o, blocks["g"], o_norm, H, V), new_memory, new_conv


def mom_step_ort_cuda(proj: Tensor, columns, conv_weights: tuple[Tensor, Tensor, Tensor], A_log: Tensor | None,
                      dt_bias: Tensor | None, memory: Tensor, conv: Tensor, o_norm: torch.nn.Module, *,
                      num_memories: int, top_k: int, delta: bool,
                      conv_every_slot: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`mom_step_ort` for ONNX Runtime's CUDA provider only: the update rule, the q/k l2 norm and the gates of every
    slot in one `GatedDeltaNet` node (no CPU kernel), on the memories `[B, S*H, V, K]` (V-major: the same bytes as
    `mom_step_ort`'s) and the conv windows with the channels block-major (every slot's q, then every slot's k, then
    every slot's v), so that one Split cuts the conv's output into the node's q, k and v. The windows come as
    `[B, 3, S, H*K, W-1]` when V = K (the bytes of `[B, S*C, W-1]`; the select that keeps untouched slots' windows
    then broadcasts the routing mask over them, where `[B, S*C, W-1]` needs a Gather per layer to expand it). Its
    l2 norm is x / sqrt(|x|^2 + 1e-12), not the model's x / sqrt(|x|^2 + 1e-6) (a relative difference of
    5e-7 / |x|^2). The slots' mixing weights come without a Relu (see `_routing`'s `untouched_weight`).

    The layer runs in the windows' dtype: fp16 graphs keep fp16 windows (they hold fp16 projection outputs, so
    nothing is rounded away), and then have no Cast but the gates' (GatedDeltaNet takes them in the state's fp32);
    fp32 windows promote an fp16 projection to fp32 (ONNX Runtime binds one type to the conv's input and window).
    Returns the normalised output `[B, H, V]` in that dtype, the new memories and windows."""
    B = conv.shape[0]
    windows = conv.reshape(B, -1, conv.shape[-1])  # [B, S*C, W-1]: the same bytes
    SC = windows.shape[1]
    q_weight, k_weight, v_weight = conv_weights
    HK, HV = q_weight.shape[0], v_weight.shape[0]
    S = SC // (2 * HK + HV)
    V = memory.shape[2]
    H = HV // V
    x = proj.to(torch.promote_types(proj.dtype, conv.dtype))
    blocks = _split_blocks(x, columns, num_memories, S, H, HK, HV, alone=(("q",), ("k", "v")))
    weight_BS, touched_BS = _routing(blocks.get("gate"), num_memories, top_k, S, x,
                                     untouched_weight=-_smallest_positive(x.dtype))

    # q once per slot, then every slot's k and v as they sit in the row: one Concat node (a Tile would be a copy
    # per repeat, and its output would still need this Concat)
    u = torch.cat([blocks["q"]] * S + [blocks["kv"]], dim=-1)  # [B, S*C]
    w_C1W = torch.cat([w.repeat(S, 1, 1) for w in conv_weights]).to(x.dtype)
    y, moved = causal_conv_silu(u[..., None], w_C1W, windows)
    qkv = y.reshape(B, SC)
    if conv.dim() == 5:  # [B, 3, S, H*K, W-1]: the mask broadcasts over blocks, channels and window
        touched_C, moved = touched_BS.reshape(B, 1, S, 1, 1), moved.reshape(conv.shape)
    else:
        slot_of_channel = torch.cat([torch.arange(S).repeat_interleave(n) for n in (HK, HK, HV)]).to(conv.device)
        touched_C = touched_BS.index_select(1, slot_of_channel)[..., None]  # [B, S*C, 1]
    new_conv = moved if conv_every_slot else torch.where(touched_C, moved, conv)
    if not delta:  # no beta to zero: k = 0 leaves the memory (decay 0 too)
        qkv = torch.where(touched_C.expand(*conv.shape[:-1], 1).reshape(B, SC), qkv, 0)
    touched = touched_BS[..., None]  # [B, S, 1]: broadcast over heads
    decay = beta = None
    f = memory.dtype  # the gates, a_log and dt_bias have the state's type (fp32 in the graphs)
    if A_log is not None and delta:  # b and a are adjacent: one select (gate inputs -inf: decay 0, beta 0)
        b_a = torch.where(touched[:, None], blocks["ba"].reshape(B, 2, S, H), float("-inf")).to(f)
        beta, decay = b_a.reshape(B, 2 * S * H).split(S * H, dim=-1)  # one Split (unbind: two Slices)
    elif delta:
        beta = torch.where(touched, blocks["b"].reshape(B, S, H), float("-inf")).reshape(B, S * H).to(f)
    elif A_log is not None:
        decay = torch.where(touched, blocks["a"].reshape(B, S, H), float("-inf")).reshape(B, S * H).to(f)
    per_slot = (memory.new_zeros(S * H), memory.new_zeros(S * H)) if A_log is None else (
        A_log.to(f).repeat(S), dt_bias.to(f).repeat(S))
    q, k, v = qkv.split([S * HK, S * HK, S * HV], dim=-1)
    o, new_memory = gated_delta_net(q.reshape(B, S * H, -1), k.reshape(B, S * H, -1), v.reshape(B, S * H, V), decay,
                                    beta, memory, *per_slot, RULES[A_log is not None, delta])
    return _mix_and_norm(weight_BS, o, blocks["g"], o_norm, H, V), new_memory, new_conv


def _mix_and_norm(weight_BS: Tensor, o: Tensor, gate: Tensor, o_norm: torch.nn.Module, H: int, V: int) -> Tensor:
    """The slots' outputs mixed by their routing weights (one matmul), then the gated output norm (one node):
    `[B, H, V]`."""
    B, S = weight_BS.shape
    o_BHV = torch.matmul(weight_BS[:, None], o.reshape(B, S, H * V)).reshape(B, H, V)
    return gated_rms_norm(o_BHV, gate.reshape(B, H, V), o_norm.weight, o_norm.eps)


def _split_blocks(x: Tensor, columns, num_memories: int, S: int, H: int, HK: int, HV: int,
                 alone: tuple[tuple[str, ...], ...]) -> dict[str, Tensor]:
    """The packed projection row's blocks by name: `gate` (the E router logits, E > 1), `q`, `k`, `v`, `b` and `a`
    (one block `ba` when there are both: they are adjacent), the output gate `g`, and the padding; a run of adjacent
    names in `alone` comes as one block, named by joining them (`kv` for ("k", "v")).

    Cut by Splits of at most four outputs each: first into the runs in `alone` and the groups of blocks between them,
    then each group that holds several blocks. ONNX Runtime's CUDA Split has a fast path for up to four outputs along
    the last axis and otherwise copies its arguments to the device, four host-to-device transfers per call."""
    widths = {"gate": num_memories, "q": HK, "k": S * HK, "v": S * HV, "b": S * H, "a": S * H}
    names = []
    for _, name in sorted((start, name) for name, start in vars(columns).items() if start >= 0):
        if names and names[-1] == "b" and name == "a":
            names[-1] = "ba"
            widths["ba"] = widths["b"] + widths["a"]
        else:
            names.append(name)
    widths["g"] = HV
    widths["padding"] = x.shape[-1] - sum(widths[name] for name in names) - HV
    names += ["g", "padding"] if widths["padding"] else ["g"]
    groups, done = [], 0
    for run in alone:
        start = names.index(run[0])
        groups += [names[done:start], list(run)]
        done = start + len(run)
    groups = [group for group in (*groups, names[done:]) if group]
    blocks = {}
    parts = x.split([sum(widths[name] for name in group) for group in groups], dim=-1)
    for group, part in zip(groups, parts, strict=True):
        if tuple(group) in alone and len(group) > 1:
            blocks["".join(group)] = part
        else:
            pieces = part.split([widths[name] for name in group], dim=-1) if len(group) > 1 else (part,)
            blocks.update(zip(group, pieces, strict=True))
    return blocks


def _routing(logits_BE: Tensor | None, num_memories: int, top_k: int, S: int, x: Tensor,
             untouched_weight: float | None = None) -> tuple[Tensor, Tensor]:
    """Each slot's mixing weight `[B, S]` and whether the token reaches it (bool `[B, S]`): the reference's
    renormalised top k of the softmax written as the softmax of the top k logits (the same function, fewer nodes);
    the shared slot (s >= E) always, weight 1.

    One scatter gives both: the top k's weights (>= 0, even where they underflow) go into a row that holds -1 for
    every routed memory, so the slots at or above 0 are the touched ones, and the weights are that row clamped at 0.
    With a (negative) `untouched_weight` the row holds it instead and the weights are the row itself, one node (a
    Relu) fewer: the untouched slots then add that weight times their output to the mix. `_smallest_positive`
    makes it vanish next to the mix's rounding: 2^-24 of an output in fp16 (where half a rounding step is at least
    2^-12 of a value), 1e-38 in fp32."""
    B, E = x.shape[0], num_memories
    if logits_BE is None:
        return x.new_ones(B, S), x.new_ones(B, S, dtype=torch.bool)
    relu = untouched_weight is None
    base_BS = torch.cat([x.new_full((E,), -1.0 if relu else untouched_weight), x.new_ones(S - E)]).expand(B, S)
    top_logits, top_i = logits_BE.topk(top_k, dim=-1)
    scattered = base_BS.scatter(-1, top_i, top_logits.softmax(-1))
    touched = greater_or_equal(scattered, scattered.new_zeros(()))
    return (scattered.relu() if relu else scattered), touched


def _smallest_positive(dtype: torch.dtype) -> float:
    """fp16's smallest subnormal (2^-24: its smallest normal, 6e-5, would move the mix); the smallest normal of
    wider types (a subnormal fp32 could be flushed to zero, and then count as touched)."""
    return 2.0 ** -24 if dtype == torch.float16 else torch.finfo(dtype).tiny


def _per_column(per_head: Tensor, S: int, V: int, dtype: torch.dtype) -> Tensor:
    """A per-head parameter `[H]` as one value per memory column `[S*H*V]` (constant-folded in the graph)."""
    return per_head.to(dtype).repeat(S).repeat_interleave(V)


def ort_add_norm(x_BD: Tensor, y_BD: Tensor, norm: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """`decode_step`'s residual add and the RMS norm after it as one `SkipSimplifiedLayerNormalization` node (in
    fp16 graphs its weight is rounded to fp16, and it normalises the fp32 sum): returns (norm(x + y), x + y)."""
    return add_rms_norm(x_BD, y_BD, norm.weight, norm.eps)
