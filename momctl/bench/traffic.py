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

from ..attention import Attention
from ..config import ModelConfig
from ..mixer import MoMMixer
from ..model import MoMForCausalLM


def decode_step_bytes(config: ModelConfig, scope: str, attention_layer: bool, batch: int, context: int,
                      dtype: torch.dtype) -> int:
    """Bytes a step of `batch` sequences at `context` tokens must move: the whole model (`scope="model"`) or one
    layer (an attention layer when `attention_layer`)."""
    element = torch.empty(0, dtype=dtype).element_size()
    if scope == "model":
        with torch.device("meta"):
            model = MoMForCausalLM(config)
        weights = sum(p.numel() for p in model.parameters()) * element
        if not config.tie_embeddings:  # the embedding table is only gathered
            weights -= (config.vocab_size - batch) * config.d_model * element
        layers = [config.is_attention_layer(i) for i in range(config.num_layers)]
    else:
        with torch.device("meta"):
            layer = Attention(config) if attention_layer else MoMMixer(config)
        weights = sum(p.numel() for p in layer.parameters()) * element
        layers = [attention_layer]
    per_sequence = sum(_attention_bytes(config, context, element) if attn else _mom_bytes(config) for attn in layers)
    return weights + batch * per_sequence


def _mom_bytes(config: ModelConfig) -> int:
    """One MoM layer, one sequence: the touched memories read and written, every conv window read and written (fp32)."""
    c = config
    slots = c.num_memories + int(c.shared_memory)
    touched = (c.top_k if c.num_memories > 1 else 1) + int(c.shared_memory)
    memory = c.num_heads * c.head_dim * c.head_v_dim * 4
    conv = max(c.conv_size - 1, 0) * (2 * c.key_dim + c.value_dim) * 4
    return 2 * (touched * memory + slots * conv)


def _attention_bytes(config: ModelConfig, context: int, element: int) -> int:
    """One attention layer, one sequence: its keys and values at `context` positions read, one position written."""
    kv_heads = config.attn_num_kv_heads or config.attn_num_heads
    head_dim = config.d_model // config.attn_num_heads
    return 2 * kv_heads * head_dim * element * (context + 1)
