"""Decoding memory per sequence: MoM's fixed recurrent state against the Transformer's growing KV cache.

A model's state at context L is `fixed_bytes + bytes_per_token * L`: fixed_bytes is what `InferenceState.nbytes`
holds for one sequence before any token (every MoM layer's memories and conv windows, fp32), bytes_per_token is
the KV cache of its attention layers, 2 * layers * kv_heads * head_dim * bytes of the dtype.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import MoMForCausalLM


def state_layout(config: ModelConfig, dtype: torch.dtype) -> dict:
    """`fixed_bytes` and `bytes_per_token` of one sequence's decoding state (computed on the meta device)."""
    with torch.device("meta"):
        fixed = MoMForCausalLM(config).init_state(1, "meta").nbytes
    kv_heads = config.attn_num_kv_heads or config.attn_num_heads
    head_dim = config.d_model // config.attn_num_heads
    element = torch.empty(0, dtype=dtype).element_size()
    per_token = 2 * len(config.attention_layers) * kv_heads * head_dim * element
    return {"fixed_bytes": fixed, "bytes_per_token": per_token}


def state_bytes(layout: dict, context: int) -> int:
    return layout["fixed_bytes"] + layout["bytes_per_token"] * context


def crossover_tokens(recurrent: dict, cache: dict) -> int | None:
    """The shortest context at which the `cache` model's state is larger than the `recurrent` model's (None if
    never)."""
    slope = cache["bytes_per_token"] - recurrent["bytes_per_token"]
    if slope <= 0:
        return None
    return max(0, (recurrent["fixed_bytes"] - cache["fixed_bytes"]) // slope + 1)
