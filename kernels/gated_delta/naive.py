"""Pure-PyTorch references of the gated delta rule (and of the delta rule, g=None): a loop and a chunked form."""
# Shapes: B batch, T time, H heads, K key dim, V value dim, N segments, C chunk length, NC number of chunks.

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .._ref_utils import apply_ref, check_chunk_size, chunk_decays, from_chunks, to_chunks


def _recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor, scale: float):
    """One plain step per token. q, k [B, T, H, K], v [B, T, H, V], beta, g [B, T, H], state [B, H, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t, beta_t = q[:, t], k[:, t], v[:, t], beta[:, t, :, None]
        if g is not None:
            state = g[:, t, :, None, None].exp() * state  # alpha_t S_{t-1}
        # alpha (I - beta k k^T) S + beta k v^T  =  alpha S + k (beta (v - (alpha S)^T k))^T
        u_t = beta_t * (v_t - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[..., :, None] * u_t[..., None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q_t))
    return torch.stack(outputs, 1), state


def _chunk(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor, scale: float, chunk_size: int
):
    """Chunkwise-parallel form (UT transform inside chunks, a loop over chunks). Shapes as in `_recurrent`."""
    T, K = q.shape[1], q.shape[-1]
    g = beta.new_zeros(beta.shape) if g is None else g
    q, k, v, beta, g = (to_chunks(x, chunk_size) for x in (q * scale, k, v, beta, g))  # [B, H, NC, C, *]
    to_start, pair, to_end = chunk_decays(g)
    # Within a chunk S_i = alpha_i S_{i-1} + k_i u_i^T with u_i = beta_i (v_i - alpha_i S_{i-1}^T k_i).
    # Unrolling S_{i-1} gives (I + A) U = beta V - (beta exp(G) K) S_0, with the strictly lower triangular
    # A_ij = beta_i exp(G_i - G_j) k_i.k_j, so U = U_0 - W S_0 where U_0 and W need no state.
    A = (beta[..., None] * pair * (k @ k.transpose(-1, -2))).tril(-1)
    eye = torch.eye(chunk_size, dtype=A.dtype, device=A.device)
    rhs = torch.cat([(beta * to_start)[..., None] * k, beta[..., None] * v], -1)
    w, u0 = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([K, v.shape[-1]], -1)
    attn = pair * (q @ k.transpose(-1, -2))  # [B, H, NC, C, C], causal, diagonal included
    q_dec, k_dec, chunk_dec = q * to_start[..., None], k * to_end[..., None], to_start[..., -1, None, None]
    outputs = []
    for c in range(q.shape[2]):
        u = u0[:, :, c] - w[:, :, c] @ state
        outputs.append(q_dec[:, :, c] @ state + attn[:, :, c] @ u)
        state = chunk_dec[:, :, c] * state + k_dec[:, :, c].transpose(-1, -2) @ u
    return from_chunks(torch.stack(outputs, 2), T), state


def recurrent_gated_delta_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule as a plain loop over time (the reference truth).

    S_i = exp(g_i) (I - beta_i k_i k_i^T) S_{i-1} + beta_i k_i v_i^T,  o_i = scale * S_i^T q_i.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        g: [B, T, H] log decays (alpha = exp(g)), or None for the plain delta rule (alpha = 1).
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
        beta,
        g,
        has_beta=True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )


def chunk_gated_delta_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule, chunkwise-parallel (WY/UT form); same result as `recurrent_gated_delta_rule_ref`.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        g: [B, T, H] log decays (alpha = exp(g)), or None for the plain delta rule (alpha = 1).
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
        beta,
        g,
        has_beta=True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )
