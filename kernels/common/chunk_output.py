"""Everything that is parallel over chunks once the chunk-start states h are known: the output and its gradients.

Per chunk and head, with G the chunk-local cumsum of the log decays, G_L its last value, h the state at the chunk
start, dh' the gradient of the state at its end, and M_ij = e^{G_i - G_j} for j <= i (0 above the diagonal):
  forward   O   = scale (Q * e^{G}) h + (scale Q K^T * M) v_new
  backward  dv_local = (scale Q K^T * M)^T dO                                (before the state pass)
            dQ = scale (dO h^T) * e^{G} + (scale dO v_new^T * M) K
            dK = (v_new dh'^T) * e^{G_L - G} + (scale dO v_new^T * M)^T Q
            dW = -dv h^T                                                      (delta family)
            dG = rowsum(Q * dQ) - rowsum(K * dK), and at the last position += e^{G_L} <h, dh'> + sum(K * dK_state)
One program per (chunk, head), launched over the layout's static chunk bound; padding rows exit at once.
The transposed score matrix is computed by its own product, never by transposing a product's result (Triton
3.4-3.7 miscompiles that pattern on Hopper, FLA issue #640).
"""
# Shapes: T packed time, H heads, K key dim, V value dim, NC chunks (layout.max_chunks), BT chunk length,
# BK / BV key / value columns per block.

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .chunk_state import value_row_width
from .launch import autotune, dot, dot_precision
from .varlen import ChunkLayout

# (4, 1): fp32 inputs at K = 256 need more shared memory than an H100 has when pipelined.
CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 2), (8, 2), (4, 3), (4, 1)]]


@autotune(CONFIGS, key=["H", "K", "V", "BK", "BV", "USE_G"])
@triton.jit
def chunk_output_fwd_kernel(q, k, rq, rk, v, h, g, o, cu_seqlens, chunk_indices, scale, H: tl.constexpr,
                            K: tl.constexpr, V: tl.constexpr, VF: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, USE_G: tl.constexpr, NORM: tl.constexpr, DOT: tl.constexpr):
    i_j, i_h = tl.program_id(0) // H, tl.program_id(0) % H
    i_n = tl.load(chunk_indices + i_j * 2)
    if i_n < 0:
        return
    i_c = tl.load(chunk_indices + i_j * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_t = bos + i_c * BT + tl.arange(0, BT)
    m_t = o_t < eos
    q += i_h * K
    k += i_h * K
    v += i_h * VF
    o += i_h * VF
    h += (i_j.to(tl.int64) * H + i_h) * K * V

    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kt = tl.load(k + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_A += dot(b_q, b_kt, DOT)  # [BT, BT]
    m_A = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_gq = tl.full([BT], scale, tl.float32)  # the row scale of Q h
    if USE_G:
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        # -inf above the diagonal and past the segment end before exp: e^{G_i - G_j} there may overflow
        b_A = b_A * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))
        b_gq *= tl.exp(b_g)
    else:
        b_A = tl.where(m_A, b_A, 0.0)
    if NORM:  # the queries are rq q and the keys rk k
        b_rq = tl.load(rq + o_t * H + i_h, mask=m_t, other=0.0)
        b_A *= b_rq[:, None] * tl.load(rk + o_t * H + i_h, mask=m_t, other=0.0)[None, :]
        b_gq *= b_rq
    b_A = (b_A * scale).to(v.dtype.element_ty)

    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
            b_o += dot(b_q, b_h, DOT)  # [BT, BV]
        b_o *= b_gq[:, None]
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = o_t[:, None] * (H * VF) + o_v[None, :]
        b_o += dot(b_A, tl.load(v + p_v, mask=m_tv, other=0.0), DOT)
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)


@autotune(CONFIGS, key=["H", "K", "V", "BK", "BV", "USE_G"])
@triton.jit
def chunk_output_bwd_kernel_dv(q, k, rq, rk, g, do, dv, cu_seqlens, chunk_indices, scale, H: tl.constexpr,
                               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                               BV: tl.constexpr, USE_G: tl.constexpr, NORM: tl.constexpr, DOT: tl.constexpr):
    i_j, i_h = tl.program_id(0) // H, tl.program_id(0) % H
    i_n = tl.load(chunk_indices + i_j * 2)
    if i_n < 0:
        return
    i_c = tl.load(chunk_indices + i_j * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_t = bos + i_c * BT + tl.arange(0, BT)
    m_t = o_t < eos
    q += i_h * K
    k += i_h * K
    do += i_h * V
    dv += i_h * V

    # the transposed scores: row j (key), column i (query)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_qt = tl.load(q + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_At += dot(b_k, b_qt, DOT)  # [BT, BT]
    m_At = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_At = b_At * tl.exp(tl.where(m_At, b_g[None, :] - b_g[:, None], float("-inf")))
    else:
        b_At = tl.where(m_At, b_At, 0.0)
    if NORM:  # the queries are rq q and the keys rk k
        b_At *= tl.load(rk + o_t * H + i_h, mask=m_t, other=0.0)[:, None] * \
            tl.load(rq + o_t * H + i_h, mask=m_t, other=0.0)[None, :]
    b_At = (b_At * scale).to(do.dtype.element_ty)

    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = o_t[:, None] * (H * V) + o_v[None, :]
        b_dv = dot(b_At, tl.load(do + p_v, mask=m_tv, other=0.0), DOT)  # [BT, BV]
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)


# ACCUMULATE adds to dq, dk, dw, dg: restore them between the configs autotuning tries.
@autotune(CONFIGS, key=["H", "K", "V", "BK", "BV", "DELTA", "USE_G"], restore=("dq", "dk", "dw", "dg"))
@triton.jit
def chunk_output_bwd_kernel_dqkwg(q, k, rq, rk, v, h, dh, hdh, g, do, dv, dq, dk, dw, dg, cu_seqlens, chunk_indices,
                                  scale, NC, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, VF: tl.constexpr,
                                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DELTA: tl.constexpr,
                                  USE_G: tl.constexpr, NORM: tl.constexpr, ACCUMULATE: tl.constexpr,
                                  HDH_ROWS: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr):
    i_j, i_h = tl.program_id(0) // H, tl.program_id(0) % H
    i_n = tl.load(chunk_indices + i_j * 2)
    if i_n < 0:
        return
    i_c = tl.load(chunk_indices + i_j * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_c * BT
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < eos
    q += i_h * K
    k += i_h * K
    dq += i_h * K
    dk += i_h * K
    v += i_h * VF
    do += i_h * VF
    if DELTA:
        dw += i_h * K
        dv += i_h * VF
    h += (i_j.to(tl.int64) * H + i_h) * K * V
    dh += (i_j.to(tl.int64) * H + i_h) * K * V

    # dP = dO v_new^T and, by its own product, dP^T
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dst = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = o_t[:, None] * (H * VF) + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0)  # [BT, BV]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        b_ds += dot(b_do, tl.trans(b_v), DOT)
        b_dst += dot(b_v, tl.trans(b_do), DOT)
    m_A = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    m_At = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        t_last = tl.minimum(t0 + BT, eos) - 1
        b_g_last = tl.load(g + t_last * H + i_h).to(tl.float32)
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_ds = b_ds * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))
        b_dst = b_dst * tl.exp(tl.where(m_At, b_g[None, :] - b_g[:, None], float("-inf")))
        # the state update's share of dG_L, part 1: e^{G_L} <h, dh'> (summed by the state pass, shares per V block)
        o_r = tl.arange(0, BR)
        b_hdh = tl.sum(tl.load(hdh + (o_r * NC + i_j) * H + i_h, mask=o_r < HDH_ROWS, other=0.0), 0)
        b_dG = tl.where(o_t == t_last, b_hdh * tl.exp(b_g_last), 0.0)
    else:
        b_ds = tl.where(m_A, b_ds, 0.0)
        b_dst = tl.where(m_At, b_dst, 0.0)
    if NORM:  # the queries are rq q and the keys rk k: dQ gets dP (K rk), dK gets dP^T (Q rq)
        b_rq = tl.load(rq + o_t * H + i_h, mask=m_t, other=0.0)
        b_rk = tl.load(rk + o_t * H + i_h, mask=m_t, other=0.0)
        b_ds *= b_rk[None, :]
        b_dst *= b_rq[None, :]
    b_ds = (b_ds * scale).to(k.dtype.element_ty)
    b_dst = (b_dst * scale).to(k.dtype.element_ty)

    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        if DELTA:
            b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            p_v = o_t[:, None] * (H * VF) + o_v[None, :]
            m_s = m_v[:, None] & m_k[None, :]
            p_s = o_v[:, None] + o_k[None, :] * V
            b_ht = tl.load(h + p_s, mask=m_s, other=0.0)  # [BV, BK]
            b_dht = tl.load(dh + p_s, mask=m_s, other=0.0)
            b_dq += dot(tl.load(do + p_v, mask=m_tv, other=0.0), b_ht, DOT)  # [BT, BK]
            b_dk += dot(tl.load(v + p_v, mask=m_tv, other=0.0), b_dht, DOT)
            if DELTA:
                b_dw += dot(tl.load(dv + p_v, mask=m_tv, other=0.0), b_ht, DOT)
        m_tk = m_t[:, None] & m_k[None, :]
        p_k = o_t[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(q + p_k, mask=m_tk, other=0.0)  # [BT, BK]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        if USE_G:
            b_qf, b_kf = b_q.to(tl.float32), b_k.to(tl.float32)  # the normalised rows, in fp32
            if NORM:
                b_qf *= b_rq[:, None]
                b_kf *= b_rk[:, None]
            b_dq *= (tl.exp(b_g) * scale)[:, None]
            b_dk *= tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)[:, None]
            # part 2: sum(K * dK_state)
            b_dG_last = tl.sum(b_dk * b_kf)
        else:
            b_dq *= scale
        b_dq += dot(b_ds, b_k, DOT)
        b_dk += dot(b_dst, b_q, DOT)
        if USE_G:
            b_dG += tl.sum(b_dq * b_qf, 1) - tl.sum(b_dk * b_kf, 1)
            b_dG += tl.where(o_t == t_last, b_dG_last, 0.0)
        if ACCUMULATE:  # the sums over the earlier value columns
            b_dq += tl.load(dq + p_k, mask=m_tk, other=0.0).to(tl.float32)
            b_dk += tl.load(dk + p_k, mask=m_tk, other=0.0).to(tl.float32)
            if DELTA:
                b_dw -= tl.load(dw + p_k, mask=m_tk, other=0.0).to(tl.float32)
        tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)
        if DELTA:
            tl.store(dw + p_k, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    if USE_G:
        if ACCUMULATE:
            b_dG += tl.load(dg + o_t * H + i_h, mask=m_t, other=0.0)
        tl.store(dg + o_t * H + i_h, b_dG, mask=m_t)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(K: int, V: int, max_bv: int) -> tuple[int, int]:
    return min(64, max(16, triton.next_power_of_2(K))), min(max_bv, max(16, triton.next_power_of_2(V)))


def chunk_output_fwd(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, h: torch.Tensor,
                     g_cum: torch.Tensor | None, scale: float, layout: ChunkLayout, o: torch.Tensor, *,
                     rq: torch.Tensor | None = None, rk: torch.Tensor | None = None) -> None:
    """Write o `[1, T, H, V]` from q, k `[1, T, H, K]` (normalised, or raw with their fp32 rstd rq, rk `[1, T, H]`),
    v_new `[1, T, H, V]`, the chunk-start states h `[NC, H, K, V]` and the fp32 chunk-local cumsum g_cum
    `[1, T, H]` (None: no decay). v_new and o may be the same column slice of wider tensors, h those columns'
    states (`value_row_width`)."""
    _, T, H, K = q.shape
    V = v_new.shape[-1]
    VF = value_row_width([v_new, o], [])
    BK, BV = _blocks(K, V, 128)
    if layout.max_chunks:
        chunk_output_fwd_kernel[(layout.max_chunks * H,)](
            q, k, rq, rk, v_new, h, g_cum, o, layout.cu_seqlens, layout.chunk_indices, scale, H=H, K=K, V=V, VF=VF,
            BT=layout.chunk_size, BK=BK, BV=BV, USE_G=g_cum is not None, NORM=rk is not None,
            DOT=dot_precision(q.dtype))


def chunk_output_bwd_dv(q: torch.Tensor, k: torch.Tensor, g_cum: torch.Tensor | None, do: torch.Tensor,
                        scale: float, layout: ChunkLayout, *, rq: torch.Tensor | None = None,
                        rk: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of v_new from inside its own chunk, (scale Q K^T * M)^T dO, `[1, T, H, V]` in do.dtype (q, k
    as in `chunk_output_fwd`)."""
    _, T, H, K = q.shape
    V = do.shape[-1]
    BK, BV = _blocks(K, V, 128)
    dv = _empty(do.shape, do.dtype, do.device)
    if layout.max_chunks:
        chunk_output_bwd_kernel_dv[(layout.max_chunks * H,)](
            q, k, rq, rk, g_cum, do, dv, layout.cu_seqlens, layout.chunk_indices, scale, H=H, K=K, V=V,
            BT=layout.chunk_size, BK=BK, BV=BV, USE_G=g_cum is not None, NORM=rk is not None,
            DOT=dot_precision(q.dtype))
    return dv


@dataclass
class QKWGradients:
    """dq, dk `[1, T, H, K]` (dk in fp32 for the delta rule without decay), dw (delta family, else None) and the fp32
    dG `[1, T, H]` (decay only, else None)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dw: torch.Tensor | None
    dG: torch.Tensor | None

    @classmethod
    def empty(cls, q: torch.Tensor, delta: bool, decay: bool) -> QKWGradients:
        _, T, H, _ = q.shape
        # The delta rule without decay has the least margin under the GPU tests' 5e-3 bound: a bf16 dk here took its
        # dk from 4.6e-3 to 4.9e-3 (bf16 interpreter). The gated rules have room, and keep the smaller buffer.
        dk_dtype = torch.float32 if delta and not decay else q.dtype
        return cls(_empty(q.shape, q.dtype, q.device), _empty(q.shape, dk_dtype, q.device),
                   _empty(q.shape, q.dtype, q.device) if delta else None,
                   _empty((1, T, H), torch.float32, q.device) if decay else None)


def chunk_output_bwd_dqkwg(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, h: torch.Tensor,
                           dh: torch.Tensor, hdh: torch.Tensor | None, g_cum: torch.Tensor | None, do: torch.Tensor,
                           dv: torch.Tensor | None, scale: float, layout: ChunkLayout, grads: QKWGradients,
                           accumulate: bool, *, rq: torch.Tensor | None = None,
                           rk: torch.Tensor | None = None) -> None:
    """Write (or, with accumulate, add to) dq, dk `[1, T, H, K]`, dw (delta family: given dv, the whole gradient of
    v_new) and dG, the fp32 gradient `[1, T, H]` of the chunk-local cumsum g_cum (no decay: None). q, k as in
    `chunk_output_fwd`; dq and dk are the gradients of the normalised queries and keys.

    h: chunk-start states and dh: chunk-end state gradients, both `[NC, H, K, V]`; hdh: with a decay, the shares of
    <h, dh'> per chunk from `chunk_state_bwd` (`[rows, NC, H]`, summed over rows), else None. v_new, do and dv may be
    the same column slice of wider tensors, with h, dh and hdh those columns' states: the gradients are then those
    columns' share, and the shares of all column slices add up to the whole.
    """
    _, T, H, K = q.shape
    V = do.shape[-1]
    VF = value_row_width([v_new, do, dv], [])
    BK, BV = _blocks(K, V, 64)
    rows = 1 if hdh is None else hdh.shape[0]
    if layout.max_chunks:
        chunk_output_bwd_kernel_dqkwg[(layout.max_chunks * H,)](
            q, k, rq, rk, v_new, h, dh, hdh, g_cum, do, dv, grads.dq, grads.dk, grads.dw, grads.dG,
            layout.cu_seqlens, layout.chunk_indices, scale, layout.max_chunks, H=H, K=K, V=V, VF=VF,
            BT=layout.chunk_size, BK=BK, BV=BV, DELTA=dv is not None, USE_G=g_cum is not None, NORM=rk is not None,
            ACCUMULATE=accumulate, HDH_ROWS=rows,
            BR=triton.next_power_of_2(rows), DOT=dot_precision(q.dtype))
