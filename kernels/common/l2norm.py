"""L2 normalisation over the last dim, y = x / sqrt(|x|^2 + 1e-6), as the chunk kernels use it: the forward only
finds rstd = 1 / sqrt(|x|^2 + 1e-6) (fp32, one per row), and the chunk kernels scale by it where they use a row of
y, so no rounded copy of y is ever made (in bf16 that rounding was the largest error of the delta rule's output).
Backward: dx = rstd * (dy - y (y . dy)) with y = rstd x.
"""
# Shapes: R rows (all leading dims flattened), D the normalised dim.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ref_utils import L2NORM_EPS
from .launch import autotune

CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 2)]


@autotune(CONFIGS, key=["D"])
@triton.jit
def l2norm_rstd_kernel(x, rstd, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m_x = m_r[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BR, BD]
    tl.store(rstd + o_r, 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) + EPS), mask=m_r)


@autotune(CONFIGS, key=["D"])
@triton.jit
def l2norm_bwd_kernel(x, rstd, dy, dy2, dx, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                      HAS_DY2: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m_x = m_r[:, None] & (o_d < D)[None, :]
    p_x = o_r[:, None] * D + o_d[None, :]
    b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.0)  # [BR]
    b_y = tl.load(x + p_x, mask=m_x, other=0.0).to(tl.float32) * b_rstd[:, None]  # [BR, BD]
    b_dy = tl.load(dy + p_x, mask=m_x, other=0.0).to(tl.float32)
    if HAS_DY2:
        b_dy += tl.load(dy2 + p_x, mask=m_x, other=0.0).to(tl.float32)
    b_dx = b_rstd[:, None] * (b_dy - b_y * tl.sum(b_y * b_dy, 1)[:, None])
    tl.store(dx + p_x, b_dx.to(dx.dtype.element_ty), mask=m_x)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(x: torch.Tensor) -> tuple[int, int, int, int]:
    """Rows R, dim D, the padded dim BD and rows per program BR (about 4K elements per program)."""
    D = x.shape[-1]
    R = x.numel() // max(D, 1)
    BD = max(16, triton.next_power_of_2(D))
    return R, D, BD, max(1, 4096 // BD)


def l2norm_rstd(x: torch.Tensor) -> torch.Tensor:
    """rstd = 1 / sqrt(|x|^2 + 1e-6) over the last dim (fp32, shape x.shape[:-1]); x must be contiguous."""
    assert x.is_contiguous()
    R, D, BD, BR = _blocks(x)
    rstd = _empty(x.shape[:-1], torch.float32, x.device)
    if R:
        l2norm_rstd_kernel[(triton.cdiv(R, BR),)](x, rstd, R, D=D, BR=BR, BD=BD, EPS=L2NORM_EPS)
    return rstd


def l2norm_bwd(x: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, dy2: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dx of y = l2norm(x) given dy (plus dy2, a second gradient of y, when given); in out_dtype or x.dtype."""
    assert x.is_contiguous() and dy.is_contiguous() and (dy2 is None or dy2.is_contiguous())
    R, D, BD, BR = _blocks(x)
    dx = _empty(x.shape, out_dtype or x.dtype, x.device)
    if R:
        l2norm_bwd_kernel[(triton.cdiv(R, BR),)](x, rstd, dy, dy2, dx, R, D=D, BR=BR, BD=BD,
                                                 HAS_DY2=dy2 is not None)
    return dx
