"""What a checkpoint holds: config, parameter counts (total and active per token), state size, training progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import ModelConfig
from .mixer import MoMMixer
from .model import MoMForCausalLM
from .state import AttentionState


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token): a token runs top_k of the num_memories routed memories of each MoM layer."""
    with torch.device("meta"):
        model = MoMForCausalLM(config)
    total = model.num_parameters()
    inactive = 0
    for block in model.model.layers:
        if isinstance(block.attn, MoMMixer):
            per_memory = sum(p.numel() for name, p in block.attn.named_parameters()
                             if name.split(".")[0] in ("k_proj", "v_proj", "b_proj", "a_proj")) // config.num_memories
            inactive += (config.num_memories - config.top_k) * per_memory
    return total, total - inactive


def state_bytes(config: ModelConfig) -> tuple[int, int]:
    """(fixed recurrent state bytes per sequence, KV-cache bytes per sequence per token of context)."""
    with torch.device("meta"):
        model = MoMForCausalLM(config)
        state = model.init_state(1, "meta")
    fixed = sum(layer.nbytes for layer in state.layers if not isinstance(layer, AttentionState))
    per_token = 0
    for i, block in enumerate(model.model.layers):
        if config.is_attention_layer(i):
            per_token += 2 * block.attn.num_kv_heads * block.attn.head_dim * 4  # fp32 keys + values
    return fixed, per_token


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    folder = ckpt.resolve_checkpoint(path)
    manifest = ckpt.verify_checkpoint(folder, checksums=False)
    saved = ckpt.read_config(folder)["momctl"]
    config = ModelConfig.from_dict(saved["model"])
    total, active = parameter_counts(config)
    fixed, per_token = state_bytes(config)
    info: dict[str, Any] = {"checkpoint": str(folder), "step": manifest["step"], "model": config.to_dict(),
                            "parameters": total, "active_parameters_per_token": active,
                            "state_bytes_per_sequence": fixed, "kv_cache_bytes_per_token": per_token,
                            "tokenizer": saved.get("tokenizer", {}), "data": saved["run"]["data"]}
    try:
        training = ckpt.load_training_state(folder)
        info["train_loss"], info["val_loss"] = training.get("train_loss"), training.get("val_loss")
    except Exception:  # a portable checkpoint may ship without its resume state
        info["train_loss"] = info["val_loss"] = None
    return info
