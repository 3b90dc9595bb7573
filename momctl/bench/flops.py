"""Matmul FLOPs of one forward: the useful work, not what an implementation spends on padding or recomputation.

A training step (forward + backward) counts three forwards. Decode and generate report no FLOP rate.
"""

from __future__ import annotations

from ..config import ModelConfig

CHUNK = 64  # chunk length of the chunked recurrence


def mom_layer_flops(config: ModelConfig, batch: int, seq_len: int) -> float:
    """One MoM layer (E=1 without shared memory is Gated DeltaNet).

    Projections: q, output gate, o_proj and router once per token; k, v, beta, decay once per routed copy.
    Recurrence per copy and head, chunked with C = 64: 3KV (w h, q h, k^T v_new) + C(3K + 2V) (k k^T, solve
    products, q k^T, attention times values).
    """
    c = config
    A = c.top_k + int(c.shared_memory)
    K, V, H = c.head_dim, c.head_v_dim, c.num_heads
    router = c.num_memories if c.num_memories > 1 else 0
    per_token = c.d_model * (c.key_dim + 2 * c.value_dim + router)
    per_copy = c.d_model * (c.key_dim + c.value_dim + 2 * H) + H * (3 * K * V + CHUNK * (3 * K + 2 * V))
    return 2.0 * batch * seq_len * (per_token + A * per_copy)


def attention_layer_flops(config: ModelConfig, batch: int, seq_len: int) -> float:
    """One causal softmax attention layer: q, k, v, o projections plus q k^T and p v over the causal half."""
    D = config.d_model
    h = config.attn_num_heads
    kv = config.attn_num_kv_heads or h
    d = D // h
    projections = 2.0 * batch * seq_len * D * (2 * D + 2 * kv * d)
    pairs = seq_len * (seq_len + 1) / 2
    return projections + 2.0 * 2 * batch * h * d * pairs


def model_flops(config: ModelConfig, batch: int, seq_len: int) -> float:
    """The whole causal LM: every block's mixer and SwiGLU MLP, and the output head."""
    tokens = batch * seq_len
    total = 2.0 * tokens * (3 * config.d_model * config.mlp_size) * config.num_layers
    total += 2.0 * tokens * config.d_model * config.vocab_size
    for i in range(config.num_layers):
        attn = config.is_attention_layer(i)
        total += attention_layer_flops(config, batch, seq_len) if attn else mom_layer_flops(config, batch, seq_len)
    return total


def forward_flops(config: ModelConfig, scope: str, attention_layer: bool, batch: int, seq_len: int) -> float:
    """FLOPs of one forward of a layer (`scope="layer"`) or of the whole model."""
    if scope == "model":
        return model_flops(config, batch, seq_len)
    if attention_layer:
        return attention_layer_flops(config, batch, seq_len)
    return mom_layer_flops(config, batch, seq_len)
