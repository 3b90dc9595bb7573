"""The exported graph's inputs and outputs: their names, shapes and dtypes (the bundle's runtime contract), and the
graph's body, `decode_step` between the ONNX layouts and `StepState`.

Names follow onnxruntime-genai's convention for recurrent models: per layer i, a MoM layer reads
`past_key_values.{i}.recurrent_state` and `past_key_values.{i}.conv_state` `[B, S*C, W-1]` and writes
`present.{i}.recurrent_state` / `present.{i}.conv_state`; an attention layer reads `past_key_values.{i}.key` /
`.value` `[B, h, L, d]` and writes `present.{i}.key` / `.value`, and then `position_ids [B]` (the real tokens each
sequence has seen) is an input. Only the batch axis is dynamic.

The memories are `[B, S*H, K, V]` in standard-op graphs. Graphs on ONNX Runtime's fused ops take them transposed, as
`[B, S*H*V, K, 1]` (one key vector per value column): ONNX Runtime's decode kernel at K = 256 reads a state column
with each thread of a warp on another row, which is a coalesced read only when a row is one element wide. Graphs on
its CUDA-only GatedDeltaNet (`onnxruntime-cuda`) take the same bytes as `[B, S*H, V, K]`, and their conv windows
block-major (every slot's q channels, then every slot's k, then every slot's v) instead of slot by slot, shaped
`[B, 3, S, H*K, W-1]` when V = K (the same bytes as `[B, S*C, W-1]`; the step's select of the windows then
broadcasts the routing mask, where the 3-d form needs a Gather node per layer to expand it).

The state is fp32, except the conv windows of fp16 `onnxruntime-cuda` graphs (fp16, as onnxruntime-genai keeps a
conv state in the activations' type).

Legend: B batch, W vocabulary, S slots (E routed memories + the shared one), H heads, K key head dim, V value head
dim, C conv channels of one slot, h key/value heads of an attention layer, L KV-cache capacity, d its head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..state import KVCache, MemoryState, StepState
from .ort_step import mom_step_ort, mom_step_ort_cuda, ort_add_norm
from .step import decode_step

BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # "batch" is the dynamic axis
    dtype: str  # numpy name: float32, float16, int64

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: fed as `past`, returned as `present` (same shape and dtype)."""

    past: str
    present: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"


def state_specs(config: ModelConfig, capacity: int, ops: str, dtype: str = "fp32") -> list[StateSpec]:
    """The state tensors of every layer, in graph order (`capacity` = L, the KV positions of attention layers;
    `ops` the graph's ops, which set the memories' layout; `dtype` the graph's, which sets the windows')."""
    c = config
    specs = []
    for i in range(c.num_layers):
        if c.is_attention_layer(i):
            shape = (BATCH, c.attn_num_kv_heads or c.attn_num_heads, capacity, c.d_model // c.attn_num_heads)
            names = ("key", "value")
            specs += [StateSpec(f"past_key_values.{i}.{n}", f"present.{i}.{n}", shape) for n in names]
        else:
            specs += [
                StateSpec(f"past_key_values.{i}.recurrent_state", f"present.{i}.recurrent_state",
                          memory_shape(c, ops)),
                StateSpec(f"past_key_values.{i}.conv_state", f"present.{i}.conv_state", conv_shape(c, ops),
                          conv_state_dtype(ops, dtype)),
            ]
    return specs


def conv_state_dtype(ops: str, dtype: str) -> str:
    """The conv windows' numpy dtype: fp16 in fp16 `onnxruntime-cuda` graphs, whose layers run in fp16 (a window
    holds projection outputs, fp16 values in an fp16 graph, so fp32 would only widen them), fp32 otherwise."""
    return "float16" if ops == "onnxruntime-cuda" and dtype == "fp16" else "float32"


def conv_shape(config: ModelConfig, ops: str) -> tuple[int | str, ...]:
    """A MoM layer's conv windows in the graph: `[B, S*C, W-1]`, or `[B, 3, S, H*K, W-1]` (q, k, v blocks) on the
    CUDA-only ops when the value and key widths are equal."""
    c = config
    if ops == "onnxruntime-cuda" and c.key_dim == c.value_dim:
        return BATCH, 3, c.num_slots, c.key_dim, c.conv_size - 1
    return BATCH, c.num_slots * (2 * c.key_dim + c.value_dim), c.conv_size - 1


def memory_shape(config: ModelConfig, ops: str) -> tuple[int | str, ...]:
    """A MoM layer's memories in the graph: `[B, S*H, K, V]`, or transposed `[B, S*H*V, K, 1]` on the fused ops
    (`[B, S*H, V, K]` on the CUDA-only ones)."""
    c = config
    if ops == "onnxruntime":
        return BATCH, c.num_slots * c.num_heads * c.head_v_dim, c.head_dim, 1
    if ops == "onnxruntime-cuda":
        return BATCH, c.num_slots * c.num_heads, c.head_v_dim, c.head_dim
    return BATCH, c.num_slots * c.num_heads, c.head_dim, c.head_v_dim


def io_specs(config: ModelConfig, capacity: int, ops: str,
             dtype: str = "fp32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs, in order."""
    states = state_specs(config, capacity, ops, dtype)
    inputs = [TensorSpec("input_ids", (BATCH,), "int64")]
    if config.attention_layers:
        inputs.append(TensorSpec("position_ids", (BATCH,), "int64"))
    inputs += [TensorSpec(s.past, s.shape, s.dtype) for s in states]
    outputs = [TensorSpec("logits", (BATCH, config.vocab_size), "float32")]
    outputs += [TensorSpec(s.present, s.shape, s.dtype) for s in states]
    return inputs, outputs


def to_onnx_layout(state: StepState, ops: str) -> list[torch.Tensor]:
    """A `StepState`'s tensors in graph-input order and the layouts of a graph on `ops` (fp32; positions first when
    there is attention)."""
    flat = [state.positions] if any(isinstance(layer, KVCache) for layer in state.layers) else []
    for layer in state.layers:
        if isinstance(layer, KVCache):
            flat += [layer.keys.float(), layer.values.float()]
        else:
            flat += layer_to_graph_layout(layer.memory.float(), layer.conv.float(), ops)
    return flat


def layer_to_graph_layout(memory: torch.Tensor, conv: torch.Tensor, ops: str) -> list[torch.Tensor]:
    """A MoM layer's memories `[B, S, H, K, V]` (or `[B, S*H, K, V]`) and conv windows `[B, S, W-1, C]` in the
    layouts of a graph on `ops` (same dtype)."""
    if memory.dim() == 5:
        memory = memory.flatten(1, 2)
    conv = conv.transpose(2, 3)  # [B, S, C, W-1]
    B, S, C, _ = conv.shape
    if ops == "onnxruntime":
        memory = memory.transpose(-1, -2).reshape(B, -1, memory.shape[-2], 1)
    elif ops == "onnxruntime-cuda":  # the conv channels block-major: q of every slot, then k, then v
        HV = memory.shape[1] // S * memory.shape[-1]
        HK = (C - HV) // 2
        memory = memory.transpose(-1, -2).contiguous()
        if HK == HV:  # conv_shape's [B, 3, S, H*K, W-1]
            return [memory, conv.unflatten(2, (3, HK)).transpose(1, 2).contiguous()]
        conv = torch.cat([part.flatten(1, 2) for part in conv.split([HK, HK, HV], dim=2)], 1)
    return [memory, conv.reshape(B, S * C, -1)]


class OnnxStep(nn.Module):
    """The exported function: `(input_ids, [position_ids], *past) -> (logits, *present)` in the ONNX layouts.

    Args:
        model: a `MoMForCausalLM` (fp32, or fp16 with fp32 norms and decay parameters); the state is fp32 but for
            the windows of `conv_state_dtype`, which come in and go out in the dtype they are given in.
        ops: `onnxruntime`: MoM layers step on ONNX Runtime's fused ops (`ort_step.py`) and each residual add is
            fused with the norm after it; `onnxruntime-cuda`: the same with the recurrence on its CUDA-only
            GatedDeltaNet; `standard`: standard ONNX ops only (`mom_step_ref`).
    """

    def __init__(self, model: nn.Module, ops: str = "onnxruntime") -> None:
        super().__init__()
        self.model = model
        self.has_attention = bool(model.config.attention_layers)
        self.ops = ops
        self.memory_step = {"onnxruntime": mom_step_ort, "onnxruntime-cuda": mom_step_ort_cuda}.get(ops)
        self.add_norm = ort_add_norm if self.memory_step else None

    def forward(self, input_ids: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.model.config
        B = input_ids.shape[0]
        positions = flat[0] if self.has_attention else torch.zeros_like(input_ids)
        past = iter(flat[1:] if self.has_attention else flat)
        layers = []
        for i in range(c.num_layers):
            first, second = next(past), next(past)
            if c.is_attention_layer(i):
                layers.append(KVCache(first, second))
            else:
                S, C = c.num_slots, 2 * c.key_dim + c.value_dim
                # the memory stays [B, S*H, K, V] (both steps take it so): reshaping it would copy the state
                conv = second if self.memory_step else second.reshape(B, S, C, c.conv_size - 1).transpose(2, 3)
                layers.append(MemoryState(first, conv))
        logits, new_state = decode_step(self.model, input_ids, StepState(layers, positions),
                                        memory_step=self.memory_step, add_norm=self.add_norm)
        if self.memory_step:  # the state came back in the graph's layouts
            present = [t for layer in new_state.layers for t in (
                (layer.keys, layer.values) if isinstance(layer, KVCache) else (layer.memory, layer.conv))]
        else:
            present = to_onnx_layout(new_state, self.ops)[1 if self.has_attention else 0:]
        return (logits.float(), *present)
