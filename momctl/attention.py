"""Softmax attention blocks (FLA `Attention` names): SDPA with RoPE and a KV cache, for Transformer++ and hybrids.

Legend: B batch, T new tokens, L cached + new positions, D d_model, h heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .modules import at_least_fp32
from .state import AttentionState


def rotate(x_BhTd: torch.Tensor, positions_BT: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, non-interleaved halves (GPT-NeoX / FLA layout), at integer positions `[B, T]`."""
    d = x_BhTd.shape[-1]
    dtype = torch.promote_types(x_BhTd.dtype, torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x_BhTd.device, dtype=dtype) / d)
    angles_BTf = positions_BT.to(inv_freq.dtype)[..., None] * inv_freq
    cos, sin = angles_BTf.cos()[:, None], angles_BTf.sin()[:, None]  # [B, 1, T, d/2]
    x1, x2 = at_least_fp32(x_BhTd).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BhTd.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.num_heads = config.attn_num_heads
        self.num_kv_heads = config.attn_num_kv_heads or config.attn_num_heads
        self.head_dim = D // self.num_heads
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> AttentionState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device)
        return AttentionState(keys=empty, values=empty.clone(),
                              valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device))

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None, positions_BT: torch.Tensor,
                state: AttentionState | None, return_state: bool) -> tuple[torch.Tensor, AttentionState | None]:
        """`valid_BT` None means every token is real (no mask needed without a cache)."""
        B, T, D = x_BTD.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = rotate(self.q_proj(x_BTD).view(B, T, h, d).transpose(1, 2), positions_BT, self.config.rope_theta)
        k = rotate(self.k_proj(x_BTD).view(B, T, hkv, d).transpose(1, 2), positions_BT, self.config.rope_theta)
        v = self.v_proj(x_BTD).view(B, T, hkv, d).transpose(1, 2)
        real_BT = valid_BT if valid_BT is not None else torch.ones(B, T, dtype=torch.bool, device=x_BTD.device)
        if state is not None:
            k = torch.cat([state.keys.to(k.dtype), k], dim=2)
            v = torch.cat([state.values.to(v.dtype), v], dim=2)
            key_valid_BL = torch.cat([state.valid, real_BT], dim=1)
        else:
            key_valid_BL = real_BT
        new_state = AttentionState(k, v, key_valid_BL) if return_state else None
        if hkv != h:
            k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
        if state is None and valid_BT is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            L = k.shape[2]
            query_at_T = torch.arange(L - T, L, device=x_BTD.device)
            key_at_L = torch.arange(L, device=x_BTD.device)
            causal_TL = key_at_L[None, :] <= query_at_T[:, None]
            mask_BTL = causal_TL & key_valid_BL[:, None, :]
            # A padding query sees itself, so that no softmax row is empty (its output is never used).
            mask_BTL = mask_BTL | (key_at_L[None, :] == query_at_T[:, None])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTL[:, None])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D)), new_state
