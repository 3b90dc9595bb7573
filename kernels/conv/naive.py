"""Pure-PyTorch reference of the varlen depthwise causal short convolution + SiLU with cached windows."""
# Shapes: T packed time, C channels, W filter width, N segments, L one segment's length.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def short_conv_varlen_ref(
    x: Tensor,
    weight: Tensor,
    cu_seqlens: Tensor,
    cache: Tensor | None = None,
    output_final_cache: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Depthwise causal conv + SiLU over packed segments, one segment at a time (the reference truth).

    y_i = SiLU(sum_j w[:, j] * u_{i-W+1+j}) inside each segment, where u_{-W+1} .. u_{-1} are the segment's cached
    inputs (zeros without a cache): nothing leaks across a segment boundary.

    Args:
        x: `[T, C]` inputs, segments packed along T.
        weight: `[C, W]` filter, W >= 2.
        cu_seqlens: `[N + 1]` integer offsets, segment n is `x[cu_seqlens[n] : cu_seqlens[n + 1]]` (empty allowed).
        cache: `[N, W-1, C]` the W-1 inputs before each segment, or None for zeros.
        output_final_cache: also return each segment's last W-1 inputs (taken from the cache where the segment is
            shorter than W-1; an empty segment hands its cache back).

    Returns:
        y `[T, C]` in x.dtype and the new cache `[N, W-1, C]` in x.dtype (or None). Computed in float32, or float64
        for float64 inputs; differentiable in x, weight and cache.
    """
    T, C = x.shape
    W = weight.shape[1]
    offsets = cu_seqlens.tolist()
    N = len(offsets) - 1
    if offsets[0] != 0 or offsets[-1] != T or any(b > e for b, e in zip(offsets[:-1], offsets[1:], strict=True)):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {offsets}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(dtype)
    if cache is None:
        cache = x.new_zeros(N, W - 1, C)
    ys, caches = [], []
    for n in range(N):
        L = offsets[n + 1] - offsets[n]
        u = torch.cat([cache[n].to(dtype), x[offsets[n]:offsets[n + 1]].to(dtype)])  # [W-1+L, C]
        ys.append(F.silu(sum(u[j:j + L] * w[:, j] for j in range(W))))
        caches.append(u[L:])  # the last W-1 inputs
    y = torch.cat(ys).to(x.dtype) if ys else x.new_zeros(0, C)
    return y, (torch.stack(caches).to(x.dtype) if output_final_cache else None)
