"""The model configuration: one frozen dataclass that flows CLI -> model -> checkpoint -> generate/export."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

UPDATE_RULES = ("gated_delta", "delta", "gated", "linear")
CONV_SCOPES = ("segment", "time")
AUX_LOSSES = ("global", "layerwise")


def _fail(name: str, value: Any, expected: str, fix: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r} is invalid: expected {expected}; {fix}.")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every knob of a MoM model (and of its baselines). See shared/mom-spec.md for the function they define.

    Args:
        d_model: residual width D.
        num_layers: number of blocks.
        num_heads: heads H of each MoM layer.
        head_dim: key head dim K.
        expand_v: value head dim V = head_dim * expand_v (must be an integer).
        num_memories: memories E per layer (1 = a single-memory Gated DeltaNet, no router).
        top_k: memories A each token is routed to.
        shared_memory: an always-on memory that sees every token (weight 1).
        update_rule: `gated_delta` | `delta` | `gated` | `linear`.
        conv_size: width of the short causal convolution on q, k, v.
        conv_scope: `segment` (conv over each memory's routed tokens; FLA parity) or `time` (each memory's conv sees
            the true previous tokens of the sequence).
        vocab_size: vocabulary W.
        norm_eps: RMSNorm epsilon.
        mlp_hidden_ratio: SwiGLU width rule I = 256 * ceil(int(D * ratio * 2 / 3) / 256) when intermediate_size is None.
        intermediate_size: explicit SwiGLU width I (overrides mlp_hidden_ratio).
        tie_embeddings: the output head shares the embedding matrix.
        aux_loss: load-balancing loss kind, `global` (FLA) or `layerwise` (the published checkpoints' code).
        aux_loss_scale: weight of the aux loss in training (never in eval).
        attention_layers: indices of blocks that are softmax attention (Transformer++ / hybrid).
        attn_num_heads: heads of the attention blocks (head dim D / attn_num_heads).
        attn_num_kv_heads: key/value heads of the attention blocks (None = attn_num_heads).
        rope_theta: RoPE base of the attention blocks.
        initializer_range: std of the normal init of embeddings and MLP weights.
    """

    d_model: int = 1024
    num_layers: int = 24
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    num_memories: int = 4
    top_k: int = 2
    shared_memory: bool = True
    update_rule: str = "gated_delta"
    conv_size: int = 4
    conv_scope: str = "segment"
    vocab_size: int = 32000
    norm_eps: float = 1e-6
    mlp_hidden_ratio: float = 3.0
    intermediate_size: int | None = None
    tie_embeddings: bool = True
    aux_loss: str = "global"
    aux_loss_scale: float = 0.01
    attention_layers: tuple[int, ...] = field(default_factory=tuple)
    attn_num_heads: int = 16
    attn_num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", tuple(sorted(set(int(i) for i in self.attention_layers))))
        for name in ("d_model", "num_layers", "num_heads", "head_dim", "num_memories", "top_k", "conv_size",
                     "vocab_size", "attn_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "a positive integer", f"set {name} to 1 or more")
        if not self.top_k <= self.num_memories:
            _fail("top_k", self.top_k, f"at most num_memories={self.num_memories}",
                  "lower top_k or raise num_memories")
        if self.update_rule not in UPDATE_RULES:
            _fail("update_rule", self.update_rule, f"one of {', '.join(UPDATE_RULES)}", "pick one of those")
        if self.conv_scope not in CONV_SCOPES:
            _fail("conv_scope", self.conv_scope, f"one of {', '.join(CONV_SCOPES)}", "pick one of those")
        if self.aux_loss not in AUX_LOSSES:
            _fail("aux_loss", self.aux_loss, f"one of {', '.join(AUX_LOSSES)}", "pick one of those")
        if self.conv_size < 2:
            _fail("conv_size", self.conv_size, "at least 2", "use the paper's 4")
        v_dim = self.head_dim * self.expand_v
        if not (self.expand_v > 0 and math.isclose(v_dim, round(v_dim))):
            _fail("expand_v", self.expand_v, f"a positive factor with head_dim * expand_v an integer "
                  f"(head_dim={self.head_dim})", "use 1 or 2")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "a positive float", "use 1e-6")
        if not self.mlp_hidden_ratio > 0:
            _fail("mlp_hidden_ratio", self.mlp_hidden_ratio, "a positive number", "use 3 or 4")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            _fail("intermediate_size", self.intermediate_size, "a positive integer or None",
                  "leave it None to derive it from mlp_hidden_ratio")
        if self.aux_loss_scale < 0:
            _fail("aux_loss_scale", self.aux_loss_scale, "a non-negative float", "use 0.01, or 0 to disable")
        bad = [i for i in self.attention_layers if not 0 <= i < self.num_layers]
        if bad:
            _fail("attention_layers", self.attention_layers, f"indices in [0, {self.num_layers})",
                  "drop the out-of-range indices")
        if self.d_model % self.attn_num_heads:
            _fail("attn_num_heads", self.attn_num_heads, f"a divisor of d_model={self.d_model}",
                  "pick a head count that divides d_model")
        kv = self.attn_num_kv_heads
        if kv is not None and (kv < 1 or self.attn_num_heads % kv):
            _fail("attn_num_kv_heads", kv, f"a divisor of attn_num_heads={self.attn_num_heads} or None",
                  "pick a divisor, or None for full multi-head attention")

    @property
    def head_v_dim(self) -> int:
        return round(self.head_dim * self.expand_v)

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def num_slots(self) -> int:
        """Memory states per MoM layer: the E routed memories plus the shared one."""
        return self.num_memories + int(self.shared_memory)

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 256 * math.ceil(int(self.d_model * self.mlp_hidden_ratio * 2 / 3) / 256)

    @property
    def has_decay(self) -> bool:
        return self.update_rule in ("gated_delta", "gated")

    @property
    def has_beta(self) -> bool:
        return self.update_rule in ("gated_delta", "delta")

    def is_attention_layer(self, index: int) -> bool:
        return index in self.attention_layers

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["attention_layers"] = list(self.attention_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
