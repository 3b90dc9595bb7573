"""Named model configurations: the paper's MoM models, their baselines, and small ones for CPUs."""

from __future__ import annotations

from collections.abc import Callable

from .config import ModelConfig

# Byte-level tokenizer ids plus room for special tokens; the train command sets the tokenizer's exact size.
BYTE_VOCAB_SIZE = 320


def tiny() -> ModelConfig:
    """A CPU model that trains in seconds (about 0.1M parameters outside the embeddings)."""
    return ModelConfig(d_model=64, num_layers=2, num_heads=2, head_dim=32, num_memories=4, top_k=2,
                       vocab_size=BYTE_VOCAB_SIZE, tie_embeddings=True)


def small() -> ModelConfig:
    """A model for quick GPU experiments and patient CPU runs."""
    return ModelConfig(d_model=256, num_layers=6, num_heads=2, head_dim=64, num_memories=4, top_k=2,
                       vocab_size=BYTE_VOCAB_SIZE, tie_embeddings=True)


def mom_340m() -> ModelConfig:
    """The paper's 340M MoM: 24 layers, D=1024, H=4, K=V=256, E=4, top-2, shared memory, tied embeddings."""
    return ModelConfig(d_model=1024, num_layers=24, num_heads=4, head_dim=256, num_memories=4, top_k=2,
                       shared_memory=True, mlp_hidden_ratio=3, vocab_size=32000, tie_embeddings=True)


def mom_1_3b() -> ModelConfig:
    """The paper's 1.3B MoM: D=2048, SwiGLU ratio 4 (I=5632), otherwise as 340M, untied head."""
    return mom_340m().replace(d_model=2048, mlp_hidden_ratio=4, tie_embeddings=False)


def gdn_340m() -> ModelConfig:
    """Single-memory Gated DeltaNet baseline: one memory, no router, no shared memory."""
    return mom_340m().replace(num_memories=1, top_k=1, shared_memory=False)


def transformer_340m() -> ModelConfig:
    """Transformer++ baseline: every block is SDPA attention with RoPE (16 heads of 64), same width, depth, MLP."""
    base = mom_340m()
    return base.replace(attention_layers=tuple(range(base.num_layers)), attn_num_heads=16)


def hybrid_340m() -> ModelConfig:
    """The paper's hybrid: MoM blocks with softmax attention in every sixth block (5, 11, 17, 23)."""
    return mom_340m().replace(attention_layers=(5, 11, 17, 23), attn_num_heads=16)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "mom-340m": mom_340m,
    "mom-1.3b": mom_1_3b,
    "gdn-340m": gdn_340m,
    "transformer-340m": transformer_340m,
    "hybrid-340m": hybrid_340m,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
