"""Chunk-local cumulative sums of the log decays g on the packed varlen layout.

Forward: G_i = g_1 + ... + g_i inside each chunk (inclusive, restarting at every chunk start), in fp32.
Backward: dg_i = dG_i + ... + dG_last (the reverse cumulative sum inside each chunk), where dG is the sum of the
given partial gradients of G.
"""
# Shapes: T packed time, H heads, BT chunk length, BH heads padded to a power of two.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .varlen import ChunkLayout


@triton.jit
def chunk_cumsum_fwd_kernel(g, g_cum, cu_seqlens, chunk_indices, H: tl.constexpr, BT: tl.constexpr,
                            BH: tl.constexpr):
    i_j = tl.program_id(0)
    i_n = tl.load(chunk_indices + i_j * 2)
    if i_n < 0:
        return
    i_c = tl.load(chunk_indices + i_j * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_t = bos + i_c * BT + tl.arange(0, BT)
    o_h = tl.arange(0, BH)
    m_g = (o_t < eos)[:, None] & (o_h < H)[None, :]
    p_g = o_t[:, None] * H + o_h[None, :]
    b_g = tl.load(g + p_g, mask=m_g, other=0.0).to(tl.float32)  # [BT, BH]
    tl.store(g_cum + p_g, tl.cumsum(b_g, 0), mask=m_g)


@triton.jit
def chunk_cumsum_bwd_kernel(dG, dG2, dg, cu_seqlens, chunk_indices, H: tl.constexpr, BT: tl.constexpr,
                            BH: tl.constexpr, HAS_DG2: tl.constexpr):
    i_j = tl.program_id(0)
    i_n = tl.load(chunk_indices + i_j * 2)
    if i_n < 0:
        return
    i_c = tl.load(chunk_indices + i_j * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_t = bos + i_c * BT + tl.arange(0, BT)
    o_h = tl.arange(0, BH)
    m_g = (o_t < eos)[:, None] & (o_h < H)[None, :]
    p_g = o_t[:, None] * H + o_h[None, :]
    b_dG = tl.load(dG + p_g, mask=m_g, other=0.0).to(tl.float32)  # [BT, BH]
    if HAS_DG2:
        b_dG += tl.load(dG2 + p_g, mask=m_g, other=0.0).to(tl.float32)
    tl.store(dg + p_g, tl.cumsum(b_dG, 0, reverse=True).to(dg.dtype.element_ty), mask=m_g)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def chunk_cumsum_fwd(g: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Chunk-local inclusive cumsum of g `[1, T, H]` (contiguous, any float dtype) as fp32 `[1, T, H]`."""
    assert g.is_contiguous() and g.shape[1] == layout.total
    H = g.shape[-1]
    g_cum = _empty(g.shape, torch.float32, g.device)
    if layout.max_chunks:
        chunk_cumsum_fwd_kernel[(layout.max_chunks,)](
            g, g_cum, layout.cu_seqlens, layout.chunk_indices, H=H, BT=layout.chunk_size,
            BH=max(2, triton.next_power_of_2(H)), num_warps=4)
    return g_cum


def chunk_cumsum_bwd(dG: torch.Tensor, layout: ChunkLayout, dtype: torch.dtype,
                     dG2: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of g from gradients of its chunk-local cumsum: reverse cumsum of dG (+ dG2) `[1, T, H]` in dtype."""
    assert dG.is_contiguous() and (dG2 is None or dG2.is_contiguous())
    H = dG.shape[-1]
    dg = _empty(dG.shape, dtype, dG.device)
    if layout.max_chunks:
        chunk_cumsum_bwd_kernel[(layout.max_chunks,)](
            dG, dG2, dg, layout.cu_seqlens, layout.chunk_indices, H=H, BT=layout.chunk_size,
            BH=max(2, triton.next_power_of_2(H)), HAS_DG2=dG2 is not None, num_warps=4)
    return dg
