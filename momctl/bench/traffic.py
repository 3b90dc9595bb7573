"""Bytes one decoding step must move through GPU memory: the useful traffic, not what an implementation spends.

Decoding is bound by memory bandwidth, so a step's achieved GB/s (these bytes over its time) is its efficiency
against the device's copy bandwidth (about 3.0 TB/s on an H100). One step, `B` sequences at context `L`:
- every weight is read once (the token embedding is a gather of B rows, unless tied to the output head, which reads
  the whole table);
- a MoM layer reads and writes the memories of the slots a token reaches (top-k + the shared one; an untouched
  memory need not move) and every slot's conv window;
- an attention layer reads its KV cache at length L and writes one new entry.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import MoMForCausalLM
from ..state import MemoryState
from .state_size import state_layout


def decode_step_bytes(config: ModelConfig, scope: str, attention_layer: bool, batch: int, context: int,
                      dtype: torch.dtype) -> int:
    """Bytes a step of `batch` sequences at `context` tokens must move: the whole model (`scope="model"`) or one
    layer (an attention layer when `attention_layer`)."""
    if scope != "model":  # the layer alone, as the bench builds it
        config = config.replace(num_layers=1, attention_layers=(0,) if attention_layer else ())
    with torch.device("meta"):
        model = MoMForCausalLM(config)
    element = torch.empty(0, dtype=dtype).element_size()
    weights = model.parameters() if scope == "model" else model.model.layers[0].attn.parameters()
    weight_bytes = sum(p.numel() for p in weights) * element
    if scope == "model" and not config.tie_embeddings:  # the embedding table is only gathered
        weight_bytes -= (config.vocab_size - batch) * config.d_model * element
    slots = config.num_memories + int(config.shared_memory)
    reached = (config.top_k if config.num_memories > 1 else 1) + int(config.shared_memory)
    memories = sum(layer.memory.nbytes * reached // slots + layer.conv.nbytes
                   for layer in model.init_state(1, "meta").layers if isinstance(layer, MemoryState))
    kv_cache = state_layout(config, dtype)["bytes_per_token"] * (context + 1)
    return weight_bytes + batch * (2 * memories + kv_cache)
