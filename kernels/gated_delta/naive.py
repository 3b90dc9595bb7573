"""Pure-PyTorch references of the gated delta rule (and of the delta rule, g=None): a loop and a chunked form."""
# Shapes: B batch, T time, H heads, K key dim, V value dim, N segments, C chunk length, NC number of chunks.

from __future__ import annotations

from functools import partial
from itertools import pairwise

import torch
from torch import Tensor

from .._ref_utils import (
    _check_shape,
    _segments,
    apply_ref,
    check_chunk_size,
    chunk_decays,
    from_chunks,
    to_chunks,
)


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


def wy_repr_ref(
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g_cum: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """The WY/UT factors of every chunk: the truth for `kernels/gated_delta/wy.py`, differentiable by autograd.

    Inside a chunk of c positions, A_ij = beta_i exp(g_cum_i - g_cum_j) k_i.k_j for j < i (else 0) and
    w = (I + A)^-1 diag(beta exp(g_cum)) K,  u = (I + A)^-1 diag(beta) V.  Chunks restart at every segment.

    Args:
        k: [B, T, H, K] keys (used as given: normalise them first).
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        g_cum: [B, T, H] log decays cumulated from each chunk's start (inclusive), or None for zeros.
        cu_seqlens: [N + 1] integer offsets of N packed segments (B must be 1, empty segments allowed),
            or None for B independent sequences.
        chunk_size: C, the chunk length.

    Returns:
        w [B, T, H, K], u [B, T, H, V] and A_inv [B, T, H, C] in the compute dtype (float32, or float64 for
        float64 inputs): A_inv[b, t, h, j] is entry (i, j) of its chunk's (I + A)^-1, i the position of t in
        its chunk, and 0 for j at or past the chunk's length.
    """
    check_chunk_size(chunk_size)
    _check_shape("k", k, (None, None, None, None), "[B, T, H, K]")
    B, T, H, K = k.shape
    _check_shape("v", v, (B, T, H, None), "[B, T, H, V]")
    _check_shape("beta", beta, (B, T, H), "[B, T, H]")
    if g_cum is not None:
        _check_shape("g_cum", g_cum, (B, T, H), "[B, T, H]")
    offsets = _segments(cu_seqlens, B, T) or [0, T]
    dtype = torch.promote_types(torch.promote_types(k.dtype, v.dtype), torch.float32)
    k, v, beta = k.to(dtype), v.to(dtype), beta.to(dtype)
    g_cum = beta.new_zeros(beta.shape) if g_cum is None else g_cum.to(dtype)
    C = chunk_size
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    eye = torch.eye(C, dtype=dtype, device=k.device)

    def run(lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
        kc, vc, bc, gc = (to_chunks(x[:, lo:hi], C) for x in (k, v, beta, g_cum))  # [B, H, NC, C, *]
        # Mask j >= i before exp: g_cum_i - g_cum_j > 0 there and may overflow.
        decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()
        A = bc[..., None] * decay * (kc @ kc.transpose(-1, -2))
        A_inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
        w = A_inv @ ((bc * gc.exp())[..., None] * kc)
        u = A_inv @ (bc[..., None] * vc)
        return tuple(from_chunks(x, hi - lo) for x in (w, u, A_inv))

    pieces = [run(lo, hi) for lo, hi in pairwise(offsets) if hi > lo]
    if not pieces:  # T == 0
        return k.new_zeros(B, 0, H, K), v.new_zeros(B, 0, H, v.shape[-1]), k.new_zeros(B, 0, H, C)
    return tuple(torch.cat(parts, 1) for parts in zip(*pieces, strict=True))
