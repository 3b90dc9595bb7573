"""Pure-PyTorch references of gated linear attention (and of linear attention, g=None): a loop and a chunked form."""
# Shapes: B batch, T time, H heads, K key dim, V value dim, N segments, C chunk length, NC number of chunks.

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .._ref_utils import apply_ref, check_chunk_size, chunk_decays, from_chunks, to_chunks


def _recurrent(q: Tensor, k: Tensor, v: Tensor, beta: None, g: Tensor | None, state: Tensor, scale: float):
    """One plain step per token. q, k [B, T, H, K], v [B, T, H, V], g [B, T, H], state [B, H, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        if g is not None:
            state = g[:, t, :, None, None].exp() * state  # alpha_t S_{t-1}
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]  # + k_t v_t^T
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, 1), state


def _chunk(q: Tensor, k: Tensor, v: Tensor, beta: None, g: Tensor | None, state: Tensor, scale: float, chunk_size: int):
    """Chunked linear attention with decay (a loop over chunks only). Shapes as in `_recurrent`."""
    T = q.shape[1]
    g = q.new_zeros(q.shape[:3]) if g is None else g
    q, k, v, g = (to_chunks(x, chunk_size) for x in (q * scale, k, v, g))  # [B, H, NC, C, *]
    to_start, pair, to_end = chunk_decays(g)
    # o_i = exp(G_i) S_0^T q_i + sum_{j <= i} exp(G_i - G_j) (q_i.k_j) v_j
    # S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j v_j^T            (G: log decay cumulated inside the chunk)
    intra = (pair * (q @ k.transpose(-1, -2))) @ v  # [B, H, NC, C, V]
    q_dec, k_dec, chunk_dec = q * to_start[..., None], k * to_end[..., None], to_start[..., -1, None, None]
    outputs = []
    for c in range(q.shape[2]):
        outputs.append(q_dec[:, :, c] @ state + intra[:, :, c])
        state = chunk_dec[:, :, c] * state + k_dec[:, :, c].transpose(-1, -2) @ v[:, :, c]
    return from_chunks(torch.stack(outputs, 2), T), state


def recurrent_gated_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention as a plain loop over time (the reference truth).

    S_i = exp(g_i) S_{i-1} + k_i v_i^T,  o_i = scale * S_i^T q_i.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log decays (alpha = exp(g)), or None for plain linear attention (alpha = 1).
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        use_qk_l2norm: l2-normalise q and k over K first: x / sqrt(|x|^2 + 1e-6).
        cu_seqlens: [N + 1] integer offsets of N packed segments (B must be 1, empty segments allowed),
            or None for N = B independent sequences.

    Returns:
        o [B, T, H, V] in v.dtype, and the final state [N, H, K, V] in the compute dtype (float32, or float64
        for float64 inputs) or None unless output_final_state.
    """
    return apply_ref(
        _recurrent,
        q,
        k,
        v,
        None,
        g,
        has_beta=False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )


def chunk_gated_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention, chunkwise-parallel; same result as `recurrent_gated_rule_ref`.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log decays (alpha = exp(g)), or None for plain linear attention (alpha = 1).
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        use_qk_l2norm: l2-normalise q and k over K first: x / sqrt(|x|^2 + 1e-6).
        cu_seqlens: [N + 1] integer offsets of N packed segments (B must be 1, empty segments allowed),
            or None for N = B independent sequences.
        chunk_size: C, the chunk length; T need not be a multiple of it.

    Returns:
        o [B, T, H, V] in v.dtype, and the final state [N, H, K, V] in the compute dtype (float32, or float64
        for float64 inputs) or None unless output_final_state.
    """
    check_chunk_size(chunk_size)
    return apply_ref(
        partial(_chunk, chunk_size=chunk_size),
        q,
        k,
        v,
        None,
        g,
        has_beta=False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )
