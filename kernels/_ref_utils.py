"""Helpers shared by the pure-PyTorch reference recurrences: validation, l2norm, varlen dispatch, chunking."""
# Shapes: B batch, T time, H heads, K key dim, V value dim, N segments, C chunk length, NC number of chunks.

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor

L2NORM_EPS = 1e-6

# core(q, k, v, beta, g, state, scale) -> (o, final_state); compute dtype, batch-first, T >= 1, N == B.
Core = Callable[..., tuple[Tensor, Tensor]]


def l2norm(x: Tensor) -> Tensor:
    """x / sqrt(|x|^2 + 1e-6) along the last dim (a zero vector stays exactly zero)."""
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def _check_shape(name: str, x: object, expected: tuple[int | None, ...], legend: str) -> None:
    """Raise ValueError unless x is a floating tensor of shape `expected` (None matches any size)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape {legend}, got {got}")
    if x.dim() != len(expected) or any(e is not None and s != e for s, e in zip(x.shape, expected, strict=True)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {legend} = {want}")


def _segments(cu_seqlens: Tensor | None, B: int, T: int) -> list[int] | None:
    """Validate cu_seqlens [N+1] and return its offsets as a list (None without varlen)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise ValueError("cu_seqlens must be an integer tensor [N+1] of segment offsets")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens has shape {tuple(cu_seqlens.shape)}, expected [N+1] = (N+1,) with N >= 1")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1: q has B = {B}, expected [1, T, H, K]")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != T or any(a > b for a, b in pairwise(offsets)):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {T}, got {offsets}")
    return offsets


def apply_ref(
    core: Core,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    g: Tensor | None,
    *,
    has_beta: bool,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Validate and cast the inputs, run `core` on the batch (or on each varlen segment), cast the output back."""
    _check_shape("q", q, (None, None, None, None), "[B, T, H, K]")
    B, T, H, K = q.shape
    _check_shape("k", k, (B, T, H, K), "[B, T, H, K]")
    _check_shape("v", v, (B, T, H, None), "[B, T, H, V]")
    V = v.shape[-1]
    if has_beta:
        _check_shape("beta", beta, (B, T, H), "[B, T, H]")
    if g is not None:
        _check_shape("g", g, (B, T, H), "[B, T, H]")
    offsets = _segments(cu_seqlens, B, T)
    N = B if offsets is None else len(offsets) - 1
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (N, H, K, V), "[N, H, K, V]")

    out_dtype, dtype = v.dtype, torch.promote_types(v.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    beta = beta.to(dtype) if has_beta else None
    g = None if g is None else g.to(dtype)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = K**-0.5 if scale is None else float(scale)
    h0 = q.new_zeros(N, H, K, V) if initial_state is None else initial_state.to(dtype)

    def run(lo: int, hi: int, state: Tensor) -> tuple[Tensor, Tensor]:
        if hi == lo:  # empty sequence: no output, the state passes through
            return v[:, lo:hi], state
        piece = [None if x is None else x[:, lo:hi] for x in (q, k, v, beta, g)]
        return core(*piece, state, scale)

    if offsets is None:
        o, final = run(0, T, h0)
    else:
        runs = [run(lo, hi, h0[n : n + 1]) for n, (lo, hi) in enumerate(pairwise(offsets))]
        o = torch.cat([r[0] for r in runs], 1)
        final = torch.cat([r[1] for r in runs], 0)
    return o.to(out_dtype), final if output_final_state else None


def check_chunk_size(chunk_size: object) -> None:
    """Raise ValueError unless chunk_size is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def to_chunks(x: Tensor, C: int) -> Tensor:
    """[B, T, H, *D] -> [B, H, NC, C, *D], zero-padding T up to a multiple of C.

    Zero padding is identity padding: k = 0, beta = 0, g = 0 leave the state unchanged.
    """
    B, T = x.shape[:2]
    pad = -T % C
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], 1)
    return x.reshape(B, (T + pad) // C, C, *x.shape[2:]).movedim(3, 1)


def from_chunks(x: Tensor, T: int) -> Tensor:
    """[B, H, NC, C, V] -> [B, T, H, V], dropping the padding."""
    B, H, NC, C, V = x.shape
    return x.movedim(1, 3).reshape(B, NC * C, H, V)[:, :T]


def chunk_decays(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Decays inside each chunk from the log decays g [B, H, NC, C].

    With G_i = g_1 + ... + g_i (cumulated inside the chunk) returns
      to_start [B, H, NC, C]:    exp(G_i), the decay from the chunk start to position i (after g_i);
      pair     [B, H, NC, C, C]: exp(G_i - G_j) for j <= i and 0 above the diagonal;
      to_end   [B, H, NC, C]:    exp(G_C - G_j), the decay from position j to the chunk end.
    The upper triangle is masked to -inf BEFORE exp, so G_i - G_j > 0 (j > i) never overflows.
    """
    G = g.cumsum(-1)
    C = g.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    pair = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    return G.exp(), pair, (G[..., -1:] - G).exp()
