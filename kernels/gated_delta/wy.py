"""WY/UT representation of the gated delta rule inside chunks: Triton kernels, forward and backward.

Forward, per chunk of c <= 64 positions (chunks never cross a segment), with s = beta exp(g):
    A_ij = beta_i exp(g_i - g_j) k_i.k_j for j < i (else 0),   M = (I + A)^-1 (unit lower triangular),
    w = M diag(s) K,   u = M diag(beta) V.
M comes from D, the inverses of the four 16 x 16 diagonal blocks of I + A (forward substitution), and N = D F with
F the blocks of A below them: I + A = D^-1 (I + N) and N^4 = 0, so M = (I - N) (I + N^2) D.
Given M from an earlier call (the chunk rule's backward gets the forward's), the kernel skips all of that (SOLVE
off) and only applies it: w and u are then equal bit for bit, at half the time.

Backward, with Kb = diag(s) K and Vb = diag(beta) V (W = M Kb, U = M Vb):
    dKb = M^T dW,  dVb = M^T dU,  dM = dW Kb^T + dU Vb^T,
    dA = -M^T dM M^T on the strictly lower triangle (only the strictly lower part of dM reaches it),
    dk = s dKb + (dS + dS^T) K with dS_ij = beta_i exp(g_i - g_j) dA_ij,   dv = beta dVb,
    dbeta_i = sum_j dA_ij exp(g_i - g_j) k_i.k_j + exp(g_i) dKb_i.k_i + dVb_i.v_i,
    dg_i = sum_j A_ij dA_ij - sum_j A_ji dA_ji + s_i dKb_i.k_i   (g: the chunk-local cumulated log decays).

Precision: with bf16 k and v, every product runs on the tensor cores. Operands that are bf16 in memory enter the
dots exactly; fp32 ones (M, dA, ...) are split into bf16 hi + lo (two or three dots), so each product keeps about
fp32 accuracy and the outputs are as good as their final rounding. Other dtypes run the same code on fp32 "ieee"
dots (exact, slow).
"""
# Shapes: T packed time, H heads, K key dim, V value dim, BT = 64 chunk, BS = 16 diagonal block.

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common.launch import CHUNK_SIZE, INTERPRETED, autotune
from ..common.varlen import ChunkLayout, chunk_layout

try:  # what tl.sum reduces with; the interpreter recognises it and sums with numpy
    from triton.language.standard import _sum_combine
except ImportError:  # pragma: no cover

    @triton.jit
    def _sum_combine(a, b):
        return a + b


# The interpreter multiplies bf16 blocks as raw integer bits: there, tensor-core dots run on fp32 copies.
# The kernels avoid the jit functions of triton.language (tl.sum, tl.zeros, tl.cdiv): those stay uninterpretable
# when triton.language was imported before TRITON_INTERPRET=1 was set, as in a test session that imports it early.
_INTERPRET = tl.constexpr(INTERPRETED)

# Both kernels hold several [64, 64] fp32 blocks: ~200 registers a thread at 4 warps (2 programs an SM). The capped
# configs trade a few spills for a third program an SM; the autotuner keeps whichever is faster.
_FWD_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=8, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=2, maxnreg=168),
    triton.Config({}, num_warps=4, num_stages=1),  # fp32 inputs: less shared memory
]
# 64-wide K/V tiles only: on an H100 with Triton 3.6 the 32-wide tiles of the backward gave wrong gradients at K=64
# and an illegal memory access at K=256 (measured per config, 2026-11-22).
_BWD_CONFIGS = [triton.Config({"BK": 64, "BV": 64}, num_warps=w, num_stages=s) for w, s in [(4, 2), (8, 2), (4, 1)]]


@triton.jit
def _sum(x, axis: tl.constexpr):
    """tl.sum of an fp32 block (see the import of _sum_combine)."""
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def _split(x, IEEE: tl.constexpr):
    """An fp32 block as bf16 (hi, lo) with hi + lo = x to about 16 significant bits; (x, x) under IEEE."""
    if IEEE:
        hi, lo = x, x
    else:
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _tc_dot(a, b, acc):
    """acc + a @ b on the tensor cores, a and b bf16."""
    if _INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b to about fp32 accuracy for fp32 or bf16 blocks a, b: bf16 operands enter the tensor-core dot
    exactly, fp32 ones as split hi + lo (the lo x lo product is dropped). Under IEEE, one fp32 dot."""
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.bfloat16:
        if b.dtype == tl.bfloat16:
            acc = _tc_dot(a, b, acc)
        else:
            b_hi, b_lo = _split(b.to(tl.float32), IEEE)
            acc = _tc_dot(a, b_hi, _tc_dot(a, b_lo, acc))
    else:
        a_hi, a_lo = _split(a.to(tl.float32), IEEE)
        acc = _dot_hl(a_hi, a_lo, b, acc, IEEE)
    return acc


@triton.jit
def _dot_hl(a_hi, a_lo, b, acc, IEEE: tl.constexpr):
    """acc + a @ b for an fp32 block a given split by `_split` (kept across loops: the split is done once)."""
    if IEEE:
        acc = tl.dot(a_hi, b.to(tl.float32), acc, input_precision="ieee")
    elif b.dtype == tl.bfloat16:
        acc = _tc_dot(a_hi, b, _tc_dot(a_lo, b, acc))
    else:
        b_hi, b_lo = _split(b.to(tl.float32), IEEE)
        acc = _tc_dot(a_hi, b_hi, _tc_dot(a_lo, b_hi, _tc_dot(a_hi, b_lo, acc)))
    return acc


@triton.jit
def _dot_lh(a, b_hi, b_lo, acc, IEEE: tl.constexpr):
    """acc + a @ b for an fp32 block a and an fp32 block b given split by `_split`."""
    if IEEE:
        acc = tl.dot(a, b_hi, acc, input_precision="ieee")
    else:
        a_hi, a_lo = _split(a, IEEE)
        acc = _tc_dot(a_hi, b_hi, _tc_dot(a_lo, b_hi, _tc_dot(a_hi, b_lo, acc)))
    return acc


@triton.jit
def _chunk_bounds(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """(segment, first position, number of positions) of global chunk i_c; segment -1 marks an unused row."""
    i_n = tl.load(chunk_indices + i_c * 2)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + tl.maximum(i_n, 0)).to(tl.int64)
    eos = tl.load(cu_seqlens + tl.maximum(i_n, 0) + 1).to(tl.int64)
    t0 = bos + i_t * BT
    return i_n, t0, tl.minimum(eos - t0, BT)


@autotune(configs=_FWD_CONFIGS, key=["H", "K", "V", "USE_G", "SOLVE", "IEEE"])
@triton.jit
def wy_fwd_kernel(
    k,
    rk,
    v,
    beta,
    g,
    w,
    u,
    A_inv,
    cu_seqlens,
    chunk_indices,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    NORM: tl.constexpr,
    SOLVE: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, t0, n = _chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    if i_n < 0:
        return
    o_t = tl.arange(0, BT)
    m_t = o_t < n
    # j < i < n: rows past the chunk's end (g loaded as 0) must not reach exp(g_i - g_j) either.
    m_low = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_beta = tl.load(beta + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_s = b_beta
    if USE_G:
        b_g = tl.load(g + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_s = b_beta * tl.exp(b_g)
    # Rows of this chunk in A_inv; they double as scratch for A and the diagonal-block inverses.
    p_A = A_inv + ((t0 + o_t[:, None]) * H + i_h) * BT + o_t[None, :]

    if NORM:  # the keys are rk k: w's column scale takes rk (and S below, on both sides)
        b_rk = tl.load(rk + (t0 + o_t) * H + i_h, mask=m_t, other=0.0)
        b_s *= b_rk
    if SOLVE:
        # S = K K^T: [BT, BT]
        b_S = tl.full([BT, BT], 0.0, tl.float32)
        for i_k in range((K + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            p_k = k + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]
            b_k = tl.load(p_k, mask=m_t[:, None] & (o_k[None, :] < K), other=0.0)  # [BT, BK]
            b_S = _dot(b_k, tl.trans(b_k), b_S, IEEE)
        if NORM:  # S = diag(rk) K K^T diag(rk)
            b_S *= b_rk[:, None] * b_rk[None, :]
        b_A = b_S * b_beta[:, None]
        if USE_G:
            # Zero the difference outside m_low before exp: g_i - g_j > 0 there and may overflow.
            b_A *= tl.exp(tl.where(m_low, b_g[:, None] - b_g[None, :], 0.0))
        b_A = tl.where(m_low, b_A, 0.0)
        tl.store(p_A, b_A, mask=m_t[:, None])
        tl.debug_barrier()

        # The four diagonal blocks side by side, Y = -A_bb: [NB, BS, BS]. Forward substitution on all of them at once:
        # (I + L)^-1 = I + Y with row i of Y = -L_i + sum_{j<i} (-L_ij) Y_j, rows 0 and 1 final from the start.
        o_s = tl.arange(0, BS)
        o_b = tl.arange(0, BT // BS)
        r3 = o_b[:, None, None] * BS + o_s[None, :, None]
        p_D = A_inv + ((t0 + r3) * H + i_h) * BT + o_b[:, None, None] * BS + o_s[None, None, :]
        b_Y = -tl.load(p_D, mask=r3 < n, other=0.0)
        for i in range(2, BS):
            m_i = o_s[None, :, None] == i
            b_a = _sum(tl.where(m_i, b_Y, 0.0), 1)  # [NB, BS]: -L_i of every block
            b_a += _sum(b_a[:, :, None] * b_Y, 1)
            b_Y = tl.where(m_i, b_a[:, None, :], b_Y)
        b_Y += tl.where(o_s[None, :, None] == o_s[None, None, :], 1.0, 0.0)
        tl.debug_barrier()
        tl.store(p_D, b_Y, mask=r3 < n)
        tl.debug_barrier()

        # I + A = (I + A_diag) (I + N) with D = (I + A_diag)^-1 block diagonal and N = D F, F the blocks below the
        # diagonal. N is nilpotent over the 4 block rows: M = (I + N)^-1 D = (I - N) (I + N^2) D.
        # D and F are read back from the scratch where they are used, not held in registers in between.
        m_diag = (o_t[:, None] // BS) == (o_t[None, :] // BS)
        b_G = tl.load(p_A, mask=m_t[:, None], other=0.0)  # D on the diagonal blocks, F below, 0 above
        b_zero = tl.full([BT, BT], 0.0, tl.float32)
        b_N = _dot(tl.where(m_diag, b_G, 0.0), tl.where(m_diag, 0.0, b_G), b_zero, IEEE)
        b_ImN = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0) - b_N
        b_P = _dot(b_ImN, _dot(b_N, b_N, b_zero, IEEE), b_ImN, IEEE)
        b_D = tl.where(m_diag, tl.load(p_A, mask=m_t[:, None], other=0.0), 0.0)
        b_M = _dot(b_P, b_D, b_zero, IEEE)
        tl.debug_barrier()
        tl.store(p_A, b_M, mask=m_t[:, None])
    else:  # M from an earlier call
        b_M = tl.load(p_A, mask=m_t[:, None], other=0.0)

    # w = (M diag(s)) K, u = (M diag(beta)) V: the column scales go into the fp32 matrix so K, V enter exactly.
    b_hi, b_lo = _split(b_M * b_s[None, :], IEEE)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k[None, :] < K)
        b_k = tl.load(k + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_k, other=0.0)
        b_w = _dot_hl(b_hi, b_lo, b_k, tl.full([BT, BK], 0.0, tl.float32), IEEE)
        tl.store(w + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_k)
    # M back from A_inv rather than held in registers through the loop above.
    tl.debug_barrier()
    b_M = tl.load(p_A, mask=m_t[:, None], other=0.0)
    b_hi, b_lo = _split(b_M * b_beta[None, :], IEEE)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = m_t[:, None] & (o_v[None, :] < V)
        b_v = tl.load(v + ((t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_v, other=0.0)
        b_u = _dot_hl(b_hi, b_lo, b_v, tl.full([BT, BV], 0.0, tl.float32), IEEE)
        tl.store(u + ((t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_v)


@autotune(configs=_BWD_CONFIGS, key=["H", "K", "V", "USE_G", "IEEE"])
@triton.jit
def wy_bwd_kernel(
    k,
    rk,
    v,
    beta,
    g,
    A_inv,
    dw,
    du,
    dk,
    dv,
    dbeta,
    dg,
    cu_seqlens,
    chunk_indices,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    NORM: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, t0, n = _chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    if i_n < 0:
        return
    o_t = tl.arange(0, BT)
    m_t = o_t < n
    # j < i < n: rows past the chunk's end (g loaded as 0) must not reach exp(g_i - g_j) either.
    m_low = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_beta = tl.load(beta + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_s = b_beta
    if USE_G:
        b_g = tl.load(g + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_eg = tl.exp(b_g)
        b_s = b_beta * b_eg
    p_M = A_inv + ((t0 + o_t[:, None]) * H + i_h) * BT + o_t[None, :]
    b_Mt_hi, b_Mt_lo = _split(tl.trans(tl.load(p_M, mask=m_t[:, None], other=0.0)), IEEE)  # M^T

    # S = K K^T and dM = dW Kb^T + dU Vb^T: [BT, BT]; dv = beta * M^T dU.
    b_S = tl.full([BT, BT], 0.0, tl.float32)
    b_dM = tl.full([BT, BT], 0.0, tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k[None, :] < K)
        b_k = tl.load(k + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_k, other=0.0)
        b_dw = tl.load(dw + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_k, other=0.0)
        b_S = _dot(b_k, tl.trans(b_k), b_S, IEEE)
        b_dM = _dot(b_dw, tl.trans(b_k), b_dM, IEEE)
    if NORM:  # the keys are rk k (see the forward)
        b_rk = tl.load(rk + (t0 + o_t) * H + i_h, mask=m_t, other=0.0)
        b_S *= b_rk[:, None] * b_rk[None, :]
        b_dM *= b_rk[None, :]
    if USE_G:
        b_dM *= b_eg[None, :]
    b_db = tl.full([BT], 0.0, tl.float32)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = m_t[:, None] & (o_v[None, :] < V)
        b_v = tl.load(v + ((t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_v, other=0.0)
        b_du = tl.load(du + ((t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_v, other=0.0)
        b_dM = _dot(b_du, tl.trans(b_v), b_dM, IEEE)
        b_dvb = _dot_hl(b_Mt_hi, b_Mt_lo, b_du, tl.full([BT, BV], 0.0, tl.float32), IEEE)  # dVb = M^T dU
        b_db += _sum(b_dvb * b_v.to(tl.float32), 1)
        p_dv = dv + ((t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        tl.store(p_dv, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_v)

    # Only the strictly lower part of dM reaches the strictly lower part of dA = -M^T dM M^T.
    b_dM = tl.where(m_low, b_dM * b_beta[None, :], 0.0)
    b_dA = _dot_hl(b_Mt_hi, b_Mt_lo, b_dM, tl.full([BT, BT], 0.0, tl.float32), IEEE)
    b_dA = _dot_lh(b_dA, b_Mt_hi, b_Mt_lo, tl.full([BT, BT], 0.0, tl.float32), IEEE)
    b_dA = tl.where(m_low, -b_dA, 0.0)
    if USE_G:
        b_dA *= tl.exp(tl.where(m_low, b_g[:, None] - b_g[None, :], 0.0))
    # Now b_dA = dA * exp(g_i - g_j); with A = beta_i exp(g_i - g_j) S:
    b_dAS = b_dA * b_S
    b_db += _sum(b_dAS, 1)
    if USE_G:
        b_AdA = b_dAS * b_beta[:, None]  # A * dA
        b_dg = _sum(b_AdA, 1) - _sum(b_AdA, 0)
    b_dS = b_dA * b_beta[:, None]
    b_Z = b_dS + tl.trans(b_dS)  # dK gets (dS + dS^T) K through S = K K^T
    if NORM:
        b_Z *= b_rk[None, :]
    b_Z_hi, b_Z_lo = _split(b_Z, IEEE)

    # dk = s * (M^T dW) + (dS + dS^T) K
    b_r = tl.full([BT], 0.0, tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k[None, :] < K)
        b_k = tl.load(k + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_k, other=0.0)
        b_dw = tl.load(dw + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_k, other=0.0)
        b_dkb = _dot_hl(b_Mt_hi, b_Mt_lo, b_dw, tl.full([BT, BK], 0.0, tl.float32), IEEE)  # dKb = M^T dW
        b_r += _sum(b_dkb * b_k.to(tl.float32), 1)
        b_dk = _dot_hl(b_Z_hi, b_Z_lo, b_k, b_dkb * b_s[:, None], IEEE)
        p_dk = dk + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_k)
    # Kb_i = beta_i exp(g_i) k_i: r_i = dKb_i . k_i
    if NORM:
        b_r *= b_rk
    if USE_G:
        b_db += b_r * b_eg
        tl.store(dg + (t0 + o_t) * H + i_h, b_dg + b_r * b_s, mask=m_t)
    else:
        b_db += b_r
    tl.store(dbeta + (t0 + o_t) * H + i_h, b_db.to(dbeta.dtype.element_ty), mask=m_t)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _ieee(k: Tensor, v: Tensor) -> bool:
    """The fp32 "ieee" path unless k and v are bf16 (then other operands are split into bf16 pieces)."""
    return k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16


def _block(D: int) -> int:
    """Width of the K / V tiles of the forward kernel."""
    return min(64, max(16, triton.next_power_of_2(D)))


def _check(k: Tensor, v: Tensor, beta: Tensor, g_cum: Tensor | None, layout: ChunkLayout) -> None:
    B, T, H, K = k.shape
    assert B == 1 and v.shape[:3] == (1, T, H) and beta.shape == (1, T, H), (k.shape, v.shape, beta.shape)
    assert g_cum is None or (g_cum.shape == (1, T, H) and g_cum.dtype == torch.float32), g_cum
    assert layout.chunk_size == CHUNK_SIZE and layout.total == T, (layout.chunk_size, layout.total, T)


def wy_fwd(
    k: Tensor, v: Tensor, beta: Tensor, g_cum: Tensor | None, layout: ChunkLayout, rk: Tensor | None = None,
    A_inv: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """w, u and A_inv of every chunk (see the module docstring); given A_inv (from an earlier call on the same k,
    beta, g_cum), only w and u, without solving for it again.

    Args:
        k: [1, T, H, K] keys, bf16 / fp16 / fp32: l2-normalised, or the raw keys with their rstd in rk.
        v: [1, T, H, V] values.
        beta: [1, T, H] write strengths, any float dtype.
        g_cum: [1, T, H] fp32 log decays cumulated from each chunk's start, or None for zeros.
        layout: the chunk layout of the packed batch (chunk_size 64).
        rk: None, or [1, T, H] fp32: the keys are rk * k (`l2norm_rstd`).
        A_inv: None, or what an earlier call returned.

    Returns:
        w [1, T, H, K] in k.dtype, u [1, T, H, V] in v.dtype, and A_inv [1, T, H, 64] fp32 where
        A_inv[0, t, h, j] is entry (i, j) of the chunk's (I + A)^-1 (i = t's position in its chunk), 0 for j at
        or past the chunk's length.
    """
    _check(k, v, beta, g_cum, layout)
    _, T, H, K = k.shape
    V = v.shape[-1]
    k, v, beta = k.contiguous(), v.contiguous(), beta.contiguous()
    g_cum = None if g_cum is None else g_cum.contiguous()
    w = _empty(k.shape, k.dtype, k.device)
    u = _empty(v.shape, v.dtype, v.device)
    solve = A_inv is None
    if solve:
        A_inv = _empty((1, T, H, CHUNK_SIZE), torch.float32, k.device)
    assert A_inv.shape == (1, T, H, CHUNK_SIZE) and A_inv.dtype == torch.float32, (A_inv.shape, A_inv.dtype)
    wy_fwd_kernel[(layout.max_chunks, H)](
        k, rk, v, beta, g_cum, w, u, A_inv, layout.cu_seqlens, layout.chunk_indices,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BS=16, BK=_block(K), BV=_block(V), USE_G=g_cum is not None, NORM=rk is not None,
        SOLVE=solve, IEEE=_ieee(k, v),
    )
    return w, u, A_inv


def wy_bwd(
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g_cum: Tensor | None,
    A_inv: Tensor,
    dw: Tensor,
    du: Tensor,
    layout: ChunkLayout,
    rk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of a loss through w and u (from `wy_fwd`) w.r.t. k, v, beta and g_cum.

    Args:
        k, v, beta, g_cum, layout, rk: as given to `wy_fwd`.
        A_inv: [1, T, H, 64] fp32, as returned by `wy_fwd`.
        dw: [1, T, H, K] gradient of w, du: [1, T, H, V] gradient of u (any float dtype; bf16 is the fast path).

    Returns:
        dk [1, T, H, K] in k.dtype (the gradient of the normalised keys when rk is given), dv [1, T, H, V] in
        v.dtype, dbeta [1, T, H] in beta.dtype, and dg_cum [1, T, H] fp32 (the gradient w.r.t. the chunk-local
        cumulated values; None when g_cum is None).
    """
    _check(k, v, beta, g_cum, layout)
    _, T, H, K = k.shape
    V = v.shape[-1]
    assert A_inv.shape == (1, T, H, CHUNK_SIZE) and A_inv.dtype == torch.float32, (A_inv.shape, A_inv.dtype)
    assert dw.shape == k.shape and du.shape == v.shape, (dw.shape, du.shape)
    k, v, beta, A_inv, dw, du = (x.contiguous() for x in (k, v, beta, A_inv, dw, du))
    g_cum = None if g_cum is None else g_cum.contiguous()
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    dbeta = _empty(beta.shape, beta.dtype, beta.device)
    dg = None if g_cum is None else _empty(g_cum.shape, torch.float32, k.device)
    wy_bwd_kernel[(layout.max_chunks, H)](
        k, rk, v, beta, g_cum, A_inv, dw, du, dk, dv, dbeta, dg, layout.cu_seqlens, layout.chunk_indices,
        H=H, K=K, V=V, BT=CHUNK_SIZE, USE_G=g_cum is not None, NORM=rk is not None, IEEE=_ieee(k, v),
    )
    return dk, dv, dbeta, dg


class WYReprFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, beta, g_cum, layout):
        w, u, A_inv = wy_fwd(k, v, beta, g_cum, layout)
        ctx.save_for_backward(k, v, beta, g_cum, A_inv)
        ctx.layout = layout
        ctx.mark_non_differentiable(A_inv)
        return w, u, A_inv

    @staticmethod
    def backward(ctx, dw, du, _dA_inv):
        k, v, beta, g_cum, A_inv = ctx.saved_tensors
        dw = torch.zeros_like(k) if dw is None else dw
        du = torch.zeros_like(v) if du is None else du
        dk, dv, dbeta, dg = wy_bwd(k, v, beta, g_cum, A_inv, dw, du, ctx.layout)
        return dk, dv, dbeta, dg, None


def wy_repr(
    k: Tensor, v: Tensor, beta: Tensor, g_cum: Tensor | None = None, cu_seqlens: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """WY/UT factors of the gated delta rule in chunks of 64, differentiable in w and u (kernel of `wy_repr_ref`).

    Args:
        k: [1, T, H, K] keys (already l2-normalised).
        v: [1, T, H, V] values.
        beta: [1, T, H] write strengths.
        g_cum: [1, T, H] log decays cumulated from each chunk's start (inclusive), or None for zeros.
        cu_seqlens: [N + 1] integer offsets of N packed segments, or None for one sequence.

    Returns:
        w [1, T, H, K], u [1, T, H, V] and A_inv [1, T, H, 64] (fp32, not differentiable), as `wy_fwd`.
    """
    if k.dim() != 4 or k.shape[0] != 1:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected [1, T, H, K]: pack sequences and pass cu_seqlens")
    if v.shape[:3] != k.shape[:3] or beta.shape != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} and beta {tuple(beta.shape)} must match k {tuple(k.shape)} in [1, T, H]")
    if g_cum is not None and g_cum.shape != beta.shape:
        raise ValueError(f"g_cum has shape {tuple(g_cum.shape)}, expected [1, T, H] = {tuple(beta.shape)}")
    layout = chunk_layout(cu_seqlens, 1, k.shape[1], CHUNK_SIZE, k.device)
    return WYReprFunction.apply(k, v, beta, None if g_cum is None else g_cum.float(), layout)
