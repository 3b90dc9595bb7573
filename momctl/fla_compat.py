"""Interop with flash-linear-attention's `MomConfig` / `MomForCausalLM` (same state-dict names as ours)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .config import ModelConfig

# FLA key -> ModelConfig field, for keys that map one to one.
_RENAMES = {
    "hidden_size": "d_model",
    "num_hidden_layers": "num_layers",
    "num_heads": "num_heads",
    "head_dim": "head_dim",
    "expand_v": "expand_v",
    "num_memories": "num_memories",
    "topk": "top_k",
    "shared_mem": "shared_memory",
    "conv_size": "conv_size",
    "vocab_size": "vocab_size",
    "norm_eps": "norm_eps",
    "hidden_ratio": "mlp_hidden_ratio",
    "intermediate_size": "intermediate_size",
    "tie_word_embeddings": "tie_embeddings",
    "aux_loss_scale": "aux_loss_scale",
    "initializer_range": "initializer_range",
}
# Older names used by the published checkpoints' code.
_LEGACY = {"num_experts": "num_memories", "single_expert": "single_kv_proj", "use_gate": "use_output_gate"}
# FLA settings momctl does not implement, with the value momctl computes.
_REQUIRED = {"use_output_gate": True, "use_short_conv": True, "single_kv_proj": False, "conv_bias": False,
             "mom_backend": "gated_deltanet", "attnres_block_size": None}


def config_from_fla(fla: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from an FLA `MomConfig` dict (config.json); ValueError for settings momctl does not compute."""
    fla = {_LEGACY.get(key, key): value for key, value in fla.items()}
    for key, expected in _REQUIRED.items():
        if key in fla and fla[key] != expected:
            raise ValueError(f"FLA config {key}={fla[key]!r} is not supported by momctl "
                             f"(it computes {key}={expected!r})")
    fields = {ours: fla[theirs] for theirs, ours in _RENAMES.items() if theirs in fla and fla[theirs] is not None}
    if fla.get("hidden_ratio") is None:
        fields.pop("mlp_hidden_ratio", None)
        fields.setdefault("mlp_hidden_ratio", 4)  # FLA's GatedMLP default
    if fla.get("use_layer_wise_balance") is not None:
        fields["aux_loss"] = "global"  # FLA's MomForCausalLM computes the global loss whatever this flag says
    attn = fla.get("attn")
    if attn:
        specs = [attn] if isinstance(attn, Mapping) else list(attn)
        if len(specs) != 1 or specs[0].get("window_size") is not None:
            raise ValueError("FLA attn configs with several specs or a window_size are not supported by momctl")
        fields["attention_layers"] = tuple(specs[0]["layers"])
        fields["attn_num_heads"] = specs[0]["num_heads"]
        fields["attn_num_kv_heads"] = specs[0].get("num_kv_heads")
        fields["rope_theta"] = specs[0].get("rope_theta", 10000.0)
    return ModelConfig(**fields)


def config_to_fla(config: ModelConfig) -> dict[str, Any]:
    """FLA `MomConfig`-compatible keys for `config` (written into checkpoints' config.json)."""
    out: dict[str, Any] = {"model_type": "mom", **_REQUIRED}
    for theirs, ours in _RENAMES.items():
        out[theirs] = getattr(config, ours)
    out["intermediate_size"] = config.mlp_size
    out["use_layer_wise_balance"] = config.aux_loss == "layerwise"
    out["attn"] = None
    if config.attention_layers:
        out["attn"] = {"layers": list(config.attention_layers), "num_heads": config.attn_num_heads,
                       "num_kv_heads": config.attn_num_kv_heads, "window_size": None,
                       "rope_theta": config.rope_theta}
    return out


def load_fla_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an FLA `MomForCausalLM` state dict with strict key matching (a tied `lm_head.weight` is dropped)."""
    state = dict(state_dict)
    if model.config.tie_embeddings and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state["model.embeddings.weight"]):
            raise ValueError("lm_head.weight differs from model.embeddings.weight but the config ties them")
    model.load_state_dict(state, strict=True)
