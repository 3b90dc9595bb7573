"""Pure-PyTorch reference of one decode step on a slot-indexed state (the truth for `fused_step.py`)."""
# Shapes: B batch, A touched slots per row, S slots, H heads, K key dim, V value dim.

from __future__ import annotations

import torch
from torch import Tensor


def recurrent_step_ref(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, g: Tensor | None, state: Tensor,
                       slots: Tensor, *, delta: bool, scale: float | None = None,
                       use_qk_l2norm: bool = True) -> tuple[Tensor, Tensor]:
    """Advance slots `slots [B, A]` of `state [B, S, H, K, V]` by one token each; the other slots are copied.

    Per touched slot, with alpha = exp(g) (1 without g) and u = beta (v - alpha S^T k) (delta) or v (otherwise):
    S' = alpha S + k u^T, o = scale S'^T q. q, k `[B, A, H, K]`, v `[B, A, H, V]`, beta, g `[B, A, H]`.
    Returns o `[B, A, H, V]` in v.dtype and the new state (a new tensor, at least fp32; `state` is untouched).
    """
    B, A, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype = v.dtype
    q, k, v = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (q, k, v))
    if use_qk_l2norm:
        q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    index = slots.long()[:, :, None, None, None].expand(B, A, H, K, state.shape[-1])
    S = state.to(v.dtype).gather(1, index)  # [B, A, H, K, V]
    if g is not None:
        S = g.to(v.dtype).exp()[..., None, None] * S
    u = v
    if delta:
        u = beta.to(v.dtype)[..., None] * (v - torch.einsum("bahkv,bahk->bahv", S, k))
    S = S + k[..., :, None] * u[..., None, :]
    o = scale * torch.einsum("bahkv,bahk->bahv", S, q)
    return o.to(dtype), state.to(S.dtype).scatter(1, index, S)
