"""The sequential pass over chunks: the state at every chunk start (forward) and its gradient (backward).

Per segment and head, chunk by chunk, with G the chunk-local cumsum of the log decays, G_L its value at the chunk's
last position and h the state at the chunk start (see kernels/common/README.md):
  forward    v_new = u - W h (DELTA) or v (gated);   h' = e^{G_L} h + (K * e^{G_L - G})^T v_new
  backward   dv    = dv_local + (K * e^{G_L - G}) dh';   dh = e^{G_L} dh' + scale (Q * e^{G})^T dO - [DELTA] W^T dv
h[j] is the state at the start of global chunk j, dh[j] the gradient of the state at its end (dh' above).
One program per (segment, head, V block) holds the fp32 state [K, BV] as up to four [BKS, BV] register blocks
(K <= 4 * 64) and walks the segment's chunks; launched over all segments, empty ones pass h0 (dht) through.
"""
# Shapes: T packed time, H heads, K key dim, V value dim, N segments, NC chunks (layout.max_chunks), BT chunk
# length, BKS key rows per state block, BV value columns per program.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotune, dot, dot_precision
from .varlen import ChunkLayout

# The single-stage configs are for fp32 inputs at K = 256, where the pipelined ones need more shared memory than an
# H100 has.
CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s)
    for bv, w, s in [(32, 4, 2), (64, 4, 2), (32, 2, 3), (32, 4, 1), (16, 4, 1)]
]
MAX_K = 256


def _prune(configs, named_args, **kwargs):
    """Drop value blocks much wider than V (they only add masked lanes)."""
    V = named_args["V"] if "V" in named_args else kwargs["V"]
    keep = [c for c in configs if c.kwargs["BV"] <= max(32, triton.next_power_of_2(V))]
    return keep or configs[:1]


def _prune_bwd(configs, named_args, **kwargs):
    """`_prune`, and at K > 128 neither 64-wide value blocks nor three pipeline stages: the backward then needs 254 KB
    and 233 KB of shared memory (bf16; measured on an H100), more than a Hopper GPU has (227 KB)."""
    K = named_args["K"] if "K" in named_args else kwargs["K"]
    keep = [c for c in _prune(configs, named_args, **kwargs)
            if K <= 128 or (c.kwargs["BV"] <= 32 and c.num_stages <= 2)]
    return keep or configs[:1]


@triton.jit
def _state_tile(o_v, m_v, I: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr):
    """Offsets and mask of state block I: rows [I * BKS, (I + 1) * BKS) and columns o_v of a row-major [K, V]."""
    o_k = I * BKS + tl.arange(0, BKS)
    return o_k[:, None] * V + o_v[None, :], (o_k < K)[:, None] & m_v[None, :]


@triton.jit
def _state_blocks(p, o_s1, o_s2, o_s3, o_s4, m_s1, m_s2, m_s3, m_s4):
    """The four [BKS, BV] blocks of the state at p (blocks past K are fully masked: zeros, and unused)."""
    return (tl.load(p + o_s1, mask=m_s1, other=0.0), tl.load(p + o_s2, mask=m_s2, other=0.0),
            tl.load(p + o_s3, mask=m_s3, other=0.0), tl.load(p + o_s4, mask=m_s4, other=0.0))


@triton.jit
def _rows(p, o_t, m_t, I: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BKS: tl.constexpr):
    """[BT, BKS] block I (columns I * BKS ...) of a [T, H, D] tensor at the positions o_t; p points at the head."""
    o_d = I * BKS + tl.arange(0, BKS)
    return tl.load(p + o_t[:, None] * (H * D) + o_d[None, :], mask=m_t[:, None] & (o_d < D)[None, :], other=0.0)


@triton.jit
def _cols(p, o_t, m_t, I: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BKS: tl.constexpr):
    """[BKS, BT]: the transpose of `_rows`."""
    o_d = I * BKS + tl.arange(0, BKS)
    return tl.load(p + o_d[:, None] + o_t[None, :] * (H * D), mask=(o_d < D)[:, None] & m_t[None, :], other=0.0)


# v_new may be v itself (u overwritten in place, each element read before it is written by the same program):
# restore v between the configs autotuning tries.
@autotune(CONFIGS, key=["H", "K", "V", "DELTA", "USE_G", "N_BUCKET"], prune_configs_by={"early_config_prune": _prune},
          restore=("v",))
@triton.jit(do_not_specialize=["N_BUCKET"])
def chunk_state_fwd_kernel(k, rk, v, w, g, h, v_new, h0, ht, cu_seqlens, chunk_offsets, N_BUCKET, H: tl.constexpr,
                           K: tl.constexpr, V: tl.constexpr, VF: tl.constexpr, BT: tl.constexpr, BKS: tl.constexpr,
                           NKS: tl.constexpr,
                           BV: tl.constexpr, DELTA: tl.constexpr, USE_G: tl.constexpr, NORM: tl.constexpr,
                           USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_V_NEW: tl.constexpr,
                           DOT: tl.constexpr):
    NV = tl.cdiv(V, BV)
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    k += i_h * K
    v += i_h * VF
    if DELTA:
        w += i_h * K
    if STORE_V_NEW:
        v_new += i_h * VF
    if USE_G:
        g += i_h
    if NORM:
        rk += i_h
    o_s1, m_s1 = _state_tile(o_v, m_v, 0, K, V, BKS)
    o_s2, m_s2 = _state_tile(o_v, m_v, 1, K, V, BKS)
    o_s3, m_s3 = _state_tile(o_v, m_v, 2, K, V, BKS)
    o_s4, m_s4 = _state_tile(o_v, m_v, 3, K, V, BKS)
    if USE_H0:
        h0 += i_nh.to(tl.int64) * K * VF

    # [BKS, BV] fp32 blocks of the state
    if USE_H0:
        b_h1 = tl.load(h0 + _state_tile(o_v, m_v, 0, K, VF, BKS)[0], mask=m_s1, other=0.0).to(tl.float32)
    else:
        b_h1 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NKS > 1:
        if USE_H0:
            b_h2 = tl.load(h0 + _state_tile(o_v, m_v, 1, K, VF, BKS)[0], mask=m_s2, other=0.0).to(tl.float32)
        else:
            b_h2 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NKS > 2:
        if USE_H0:
            b_h3 = tl.load(h0 + _state_tile(o_v, m_v, 2, K, VF, BKS)[0], mask=m_s3, other=0.0).to(tl.float32)
        else:
            b_h3 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NKS > 3:
        if USE_H0:
            b_h4 = tl.load(h0 + _state_tile(o_v, m_v, 3, K, VF, BKS)[0], mask=m_s4, other=0.0).to(tl.float32)
        else:
            b_h4 = tl.zeros([BKS, BV], dtype=tl.float32)

    for i_c in range(NT):
        t0 = bos + i_c * BT
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < eos
        p_h = h + ((boc + i_c) * H + i_h) * K * V
        tl.store(p_h + o_s1, b_h1.to(h.dtype.element_ty), mask=m_s1)
        if NKS > 1:
            tl.store(p_h + o_s2, b_h2.to(h.dtype.element_ty), mask=m_s2)
        if NKS > 2:
            tl.store(p_h + o_s3, b_h3.to(h.dtype.element_ty), mask=m_s3)
        if NKS > 3:
            tl.store(p_h + o_s4, b_h4.to(h.dtype.element_ty), mask=m_s4)

        m_tv = m_t[:, None] & m_v[None, :]
        p_v = o_t[:, None] * (H * VF) + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        if DELTA:
            # v_new = u - W h
            b_v -= dot(_rows(w, o_t, m_t, 0, H, K, BKS), b_h1.to(w.dtype.element_ty), DOT)
            if NKS > 1:
                b_v -= dot(_rows(w, o_t, m_t, 1, H, K, BKS), b_h2.to(w.dtype.element_ty), DOT)
            if NKS > 2:
                b_v -= dot(_rows(w, o_t, m_t, 2, H, K, BKS), b_h3.to(w.dtype.element_ty), DOT)
            if NKS > 3:
                b_v -= dot(_rows(w, o_t, m_t, 3, H, K, BKS), b_h4.to(w.dtype.element_ty), DOT)
            if STORE_V_NEW:
                tl.store(v_new + p_v, b_v.to(v_new.dtype.element_ty), mask=m_tv)
        if USE_G:
            b_g_last = tl.load(g + (tl.minimum(t0 + BT, eos) - 1) * H).to(tl.float32)
            b_g = tl.load(g + o_t * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
            b_v = b_v * tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)[:, None]
            b_decay = tl.exp(b_g_last)
            b_h1 *= b_decay
            if NKS > 1:
                b_h2 *= b_decay
            if NKS > 2:
                b_h3 *= b_decay
            if NKS > 3:
                b_h4 *= b_decay
        if NORM:  # the keys are rk k: h += K^T (rk v_new), scaled before the one rounding of v_new
            b_v *= tl.load(rk + o_t * H, mask=m_t, other=0.0)[:, None]
        b_v = b_v.to(k.dtype.element_ty)
        # h += K^T v_new (v_new already carries e^{G_L - G})
        b_h1 += dot(_cols(k, o_t, m_t, 0, H, K, BKS), b_v, DOT)
        if NKS > 1:
            b_h2 += dot(_cols(k, o_t, m_t, 1, H, K, BKS), b_v, DOT)
        if NKS > 2:
            b_h3 += dot(_cols(k, o_t, m_t, 2, H, K, BKS), b_v, DOT)
        if NKS > 3:
            b_h4 += dot(_cols(k, o_t, m_t, 3, H, K, BKS), b_v, DOT)

    if STORE_HT:
        p_ht = ht + i_nh.to(tl.int64) * K * VF
        tl.store(p_ht + _state_tile(o_v, m_v, 0, K, VF, BKS)[0], b_h1, mask=m_s1)
        if NKS > 1:
            tl.store(p_ht + _state_tile(o_v, m_v, 1, K, VF, BKS)[0], b_h2, mask=m_s2)
        if NKS > 2:
            tl.store(p_ht + _state_tile(o_v, m_v, 2, K, VF, BKS)[0], b_h3, mask=m_s3)
        if NKS > 3:
            tl.store(p_ht + _state_tile(o_v, m_v, 3, K, VF, BKS)[0], b_h4, mask=m_s4)


# dv may be dv_local itself (updated in place), and a config writes only its own value blocks' rows of the
# zero-filled hdh: restore both between the configs autotuning tries.
@autotune(CONFIGS, key=["H", "K", "V", "DELTA", "USE_G", "N_BUCKET"],
          prune_configs_by={"early_config_prune": _prune_bwd}, restore=("dv_local", "hdh"))
@triton.jit(do_not_specialize=["N_BUCKET"])
def chunk_state_bwd_kernel(q, k, rq, rk, w, g, do, dv_local, dv, dh, dht, dh0, h, hdh, cu_seqlens, chunk_offsets,
                           N_BUCKET, scale, NC,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, VF: tl.constexpr, BT: tl.constexpr,
                           BKS: tl.constexpr,
                           NKS: tl.constexpr, BV: tl.constexpr, DELTA: tl.constexpr, USE_G: tl.constexpr,
                           NORM: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                           STORE_HDH: tl.constexpr, DOT: tl.constexpr):
    NV = tl.cdiv(V, BV)
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    q += i_h * K
    k += i_h * K
    if DELTA:
        w += i_h * K
    if USE_G:
        g += i_h
    if NORM:
        rq += i_h
        rk += i_h
    do += i_h * VF
    dv_local += i_h * VF
    dv += i_h * VF
    o_s1, m_s1 = _state_tile(o_v, m_v, 0, K, V, BKS)
    o_s2, m_s2 = _state_tile(o_v, m_v, 1, K, V, BKS)
    o_s3, m_s3 = _state_tile(o_v, m_v, 2, K, V, BKS)
    o_s4, m_s4 = _state_tile(o_v, m_v, 3, K, V, BKS)
    if USE_DHT:
        dht += i_nh.to(tl.int64) * K * VF

    # [BKS, BV] fp32 blocks of the state gradient
    if USE_DHT:
        b_dh1 = tl.load(dht + _state_tile(o_v, m_v, 0, K, VF, BKS)[0], mask=m_s1, other=0.0).to(tl.float32)
    else:
        b_dh1 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NKS > 1:
        if USE_DHT:
            b_dh2 = tl.load(dht + _state_tile(o_v, m_v, 1, K, VF, BKS)[0], mask=m_s2, other=0.0).to(tl.float32)
        else:
            b_dh2 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NKS > 2:
        if USE_DHT:
            b_dh3 = tl.load(dht + _state_tile(o_v, m_v, 2, K, VF, BKS)[0], mask=m_s3, other=0.0).to(tl.float32)
        else:
            b_dh3 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NKS > 3:
        if USE_DHT:
            b_dh4 = tl.load(dht + _state_tile(o_v, m_v, 3, K, VF, BKS)[0], mask=m_s4, other=0.0).to(tl.float32)
        else:
            b_dh4 = tl.zeros([BKS, BV], dtype=tl.float32)

    if STORE_HDH:  # h of the last chunk; the loop loads each next one a chunk ahead, off the serial path (an empty
        # segment's row boc is still inside the table, and never used)
        b_hc1, b_hc2, b_hc3, b_hc4 = _state_blocks(h + ((boc + tl.maximum(NT - 1, 0)) * H + i_h) * K * V, o_s1, o_s2,
                                                   o_s3, o_s4, m_s1, m_s2, m_s3, m_s4)

    for i_r in range(NT):
        i_c = NT - 1 - i_r
        t0 = bos + i_c * BT
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < eos
        p_dh = dh + ((boc + i_c) * H + i_h) * K * V
        tl.store(p_dh + o_s1, b_dh1.to(dh.dtype.element_ty), mask=m_s1)
        if NKS > 1:
            tl.store(p_dh + o_s2, b_dh2.to(dh.dtype.element_ty), mask=m_s2)
        if NKS > 2:
            tl.store(p_dh + o_s3, b_dh3.to(dh.dtype.element_ty), mask=m_s3)
        if NKS > 3:
            tl.store(p_dh + o_s4, b_dh4.to(dh.dtype.element_ty), mask=m_s4)
        if STORE_HDH:  # <h, dh'> of this chunk's value block, from the fp32 dh' (see chunk_state_bwd)
            # h of this chunk was loaded one iteration ahead; one reduction over the sum of the blocks' products
            b_hdh_KV = b_hc1.to(tl.float32) * b_dh1
            if NKS > 1:
                b_hdh_KV += b_hc2.to(tl.float32) * b_dh2
            if NKS > 2:
                b_hdh_KV += b_hc3.to(tl.float32) * b_dh3
            if NKS > 3:
                b_hdh_KV += b_hc4.to(tl.float32) * b_dh4
            tl.store(hdh + (i_v * NC + boc + i_c) * H + i_h, tl.sum(tl.sum(b_hdh_KV, 1), 0))
            # the next iteration's h (at the first chunk, its own again: unused)
            b_hc1, b_hc2, b_hc3, b_hc4 = _state_blocks(h + ((boc + tl.maximum(i_c - 1, 0)) * H + i_h) * K * V, o_s1,
                                                       o_s2, o_s3, o_s4, m_s1, m_s2, m_s3, m_s4)

        # dv = dv_local + (K * e^{G_L - G}) dh'
        b_dv = dot(_rows(k, o_t, m_t, 0, H, K, BKS), b_dh1.to(k.dtype.element_ty), DOT)  # [BT, BV]
        if NKS > 1:
            b_dv += dot(_rows(k, o_t, m_t, 1, H, K, BKS), b_dh2.to(k.dtype.element_ty), DOT)
        if NKS > 2:
            b_dv += dot(_rows(k, o_t, m_t, 2, H, K, BKS), b_dh3.to(k.dtype.element_ty), DOT)
        if NKS > 3:
            b_dv += dot(_rows(k, o_t, m_t, 3, H, K, BKS), b_dh4.to(k.dtype.element_ty), DOT)
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = o_t[:, None] * (H * VF) + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        if NORM:  # the keys are rk k and the queries rq q: row scales of (K dh') and of dO
            b_dv *= tl.load(rk + o_t * H, mask=m_t, other=0.0)[:, None]
            b_do *= tl.load(rq + o_t * H, mask=m_t, other=0.0)[:, None]
        if USE_G:
            b_g_last = tl.load(g + (tl.minimum(t0 + BT, eos) - 1) * H).to(tl.float32)
            b_g = tl.load(g + o_t * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
            b_dv = b_dv * tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)[:, None]
            b_do = b_do * (tl.exp(b_g) * scale)[:, None]
            b_decay = tl.exp(b_g_last)
            b_dh1 *= b_decay
            if NKS > 1:
                b_dh2 *= b_decay
            if NKS > 2:
                b_dh3 *= b_decay
            if NKS > 3:
                b_dh4 *= b_decay
        else:
            b_do = b_do * scale
        b_dv += tl.load(dv_local + p_v, mask=m_tv, other=0.0).to(tl.float32)
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)

        # dh = e^{G_L} dh' + (Q * e^{G} * scale)^T dO - [DELTA] W^T dv
        b_do = b_do.to(q.dtype.element_ty)
        b_dv = b_dv.to(q.dtype.element_ty)
        b_dh1 += dot(_cols(q, o_t, m_t, 0, H, K, BKS), b_do, DOT)
        if DELTA:
            b_dh1 -= dot(_cols(w, o_t, m_t, 0, H, K, BKS), b_dv, DOT)
        if NKS > 1:
            b_dh2 += dot(_cols(q, o_t, m_t, 1, H, K, BKS), b_do, DOT)
            if DELTA:
                b_dh2 -= dot(_cols(w, o_t, m_t, 1, H, K, BKS), b_dv, DOT)
        if NKS > 2:
            b_dh3 += dot(_cols(q, o_t, m_t, 2, H, K, BKS), b_do, DOT)
            if DELTA:
                b_dh3 -= dot(_cols(w, o_t, m_t, 2, H, K, BKS), b_dv, DOT)
        if NKS > 3:
            b_dh4 += dot(_cols(q, o_t, m_t, 3, H, K, BKS), b_do, DOT)
            if DELTA:
                b_dh4 -= dot(_cols(w, o_t, m_t, 3, H, K, BKS), b_dv, DOT)

    if STORE_DH0:
        p_dh0 = dh0 + i_nh.to(tl.int64) * K * VF
        tl.store(p_dh0 + _state_tile(o_v, m_v, 0, K, VF, BKS)[0], b_dh1, mask=m_s1)
        if NKS > 1:
            tl.store(p_dh0 + _state_tile(o_v, m_v, 1, K, VF, BKS)[0], b_dh2, mask=m_s2)
        if NKS > 2:
            tl.store(p_dh0 + _state_tile(o_v, m_v, 2, K, VF, BKS)[0], b_dh3, mask=m_s3)
        if NKS > 3:
            tl.store(p_dh0 + _state_tile(o_v, m_v, 3, K, VF, BKS)[0], b_dh4, mask=m_s4)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _state_block(K: int) -> int:
    """Key rows per state block: 64, or K rounded up to a power of two (>= 16) when smaller."""
    assert K <= MAX_K, f"K = {K} > {MAX_K}"
    return min(64, max(16, triton.next_power_of_2(K)))


def _segment_bucket(N: int) -> int:
    """The number of segments rounded up to a power of two: part of the state passes' autotune key, since one program
    walks each segment's chunks in turn, so the best value block differs between many short segments (a batch of short
    sequences) and a few long ones (one long sequence: few programs for the SMs); the kernels do not read it."""
    return triton.next_power_of_2(N)


def _grid(N: int, H: int, V: int):
    return lambda meta: (triton.cdiv(V, meta["BV"]) * N * H,)


def value_row_width(per_token: list[torch.Tensor | None], per_state: list[torch.Tensor | None]) -> int:
    """VF, the full per-head value width behind value-column views: `[1, T, H, V]` tensors (or a column slice of
    `[1, T, H, VF]` ones) and `[N, H, K, V]` states (or slices of `[N, H, K, VF]`), all with unit column stride."""
    widths = {x.stride(2) for x in per_token + per_state if x is not None}
    assert len(widths) == 1, f"value tensors of different widths {widths}"
    VF = widths.pop()
    for x in per_token:
        assert x is None or (x.stride(3) == 1 and x.stride(1) == x.shape[2] * VF), "not a column view of [1,T,H,VF]"
    for x in per_state:
        assert x is None or (x.stride(3) == 1 and x.stride(1) == x.shape[2] * VF and x.stride(0) == x.shape[1] *
                             x.stride(1)), "not a column view of [N, H, K, VF]"
    return VF


def chunk_state_fwd(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None, g_cum: torch.Tensor | None,
                    h0: torch.Tensor | None, layout: ChunkLayout, *, ht: torch.Tensor | None = None,
                    v_new: torch.Tensor | None = None, rk: torch.Tensor | None = None) -> torch.Tensor:
    """The states at every chunk start; also writes the corrected values (delta family) and the final states.

    Value tensors may be the same column slice of wider ones (`value_row_width`): the pass runs on those columns.

    Args:
        k: `[1, T, H, K]` keys: normalised, or raw with their rstd rk.
        v: `[1, T, H, V]` values v (gated family, w None) or u (delta family).
        w: `[1, T, H, K]` the WY keys of the delta family, or None for the gated family.
        g_cum: `[1, T, H]` fp32 chunk-local cumsum of the log decays, or None (no decay).
        h0: `[N, H, K, V]` fp32 initial states, or None for zeros.
        layout: the varlen chunk layout.
        ht: where to write the fp32 final states `[N, H, K, V]`, or None.
        v_new: (delta family) where to write v_new = u - W h `[1, T, H, V]`, or None; may be v itself (u is then
            overwritten, which saves a buffer of v's size).
        rk: None, or `[1, T, H]` fp32: the keys are rk * k (`l2norm_rstd`).

    Returns:
        h `[NC, H, K, V]` in k.dtype (row j: the state at the start of global chunk j).
    """
    _, T, H, K = k.shape
    V, N = v.shape[-1], layout.num_segments
    VF = value_row_width([v, v_new], [h0, ht])
    h = _empty((layout.max_chunks, H, K, V), k.dtype, k.device)
    BKS = _state_block(K)
    chunk_state_fwd_kernel[_grid(N, H, V)](
        k, rk, v, w, g_cum, h, v_new, h0, ht, layout.cu_seqlens, layout.chunk_offsets, _segment_bucket(N), H=H, K=K,
        V=V, VF=VF, BT=layout.chunk_size, BKS=BKS, NKS=triton.cdiv(K, BKS), DELTA=w is not None,
        USE_G=g_cum is not None, NORM=rk is not None, USE_H0=h0 is not None, STORE_HT=ht is not None,
        STORE_V_NEW=w is not None and v_new is not None,
        DOT=dot_precision(k.dtype))
    return h


def chunk_state_bwd(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor | None, g_cum: torch.Tensor | None,
                    do: torch.Tensor, dv_local: torch.Tensor, dv: torch.Tensor, dht: torch.Tensor | None,
                    dh0: torch.Tensor | None, h: torch.Tensor, layout: ChunkLayout, scale: float, *,
                    rq: torch.Tensor | None = None, rk: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of the states at every chunk end; also writes the gradients of v_new and of the initial states.

    With a decay it also returns <h, dh'> of every chunk (chunk-start state h, chunk-end gradient dh'), which the
    decay's gradient needs: summed here from the fp32 dh' in registers, since the sum over K x V products of the
    stored bf16 dh' loses too much (gated delta dg with an initial state, K = 256: 1.2e-2 against 3.4e-3).

    Value tensors may be the same column slice of wider ones (`value_row_width`): the pass runs on those columns.

    Args:
        q, k: `[1, T, H, K]` queries and keys, normalised or with their rstd rq, rk (`[1, T, H]` fp32, both or
            neither); w: `[1, T, H, K]` (delta family) or None.
        g_cum: `[1, T, H]` fp32 chunk-local cumsum of the log decays, or None.
        do: `[1, T, H, V]` output gradient; dv_local: `[1, T, H, V]` its part of the v_new gradient from inside
            the chunks (`chunk_output_bwd_dv`).
        dv: where to write the whole gradient of v_new `[1, T, H, V]` (may be dv_local itself).
        dht: `[N, H, K, V]` gradient of the final states, or None.
        dh0: where to write the fp32 gradient of the initial states `[N, H, K, V]`, or None.
        h: the chunk-start states `[NC, H, K, V]` of these value columns (`chunk_state_fwd`).

    Returns:
        dh `[NC, H, K, V]` in k.dtype (row j: the gradient of the state at the end of global chunk j), and with a
        decay the fp32 `[hdh_rows(V), NC, H]` shares of <h, dh'> per value block (their sum over rows), else None.
    """
    _, T, H, K = k.shape
    V, N = do.shape[-1], layout.num_segments
    VF = value_row_width([do, dv_local, dv], [dht, dh0])
    dh = _empty((layout.max_chunks, H, K, V), k.dtype, k.device)
    # One row per value block of the narrowest config; the chosen config fills its rows, the rest stay zero.
    hdh = None if g_cum is None else torch.zeros((hdh_rows(V), layout.max_chunks, H), dtype=torch.float32,
                                                 device=k.device)
    BKS = _state_block(K)
    chunk_state_bwd_kernel[_grid(N, H, V)](
        q, k, rq, rk, w, g_cum, do, dv_local, dv, dh, dht, dh0, h, hdh, layout.cu_seqlens, layout.chunk_offsets,
        _segment_bucket(N), scale, layout.max_chunks, H=H, K=K, V=V, VF=VF, BT=layout.chunk_size, BKS=BKS,
        NKS=triton.cdiv(K, BKS), DELTA=w is not None, USE_G=g_cum is not None, NORM=rk is not None,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, STORE_HDH=hdh is not None,
        DOT=dot_precision(k.dtype))
    return dh, hdh


def hdh_rows(V: int) -> int:
    """Rows of the <h, dh'> shares: V over the narrowest value block of any config."""
    return triton.cdiv(V, min(c.kwargs["BV"] for c in CONFIGS))
