"""Varlen depthwise causal short convolution + SiLU with cached windows: Triton forward and backward."""
# Shapes: T packed time, C channels, W filter width, N segments, L one segment's length. The math is in README.md.

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common.launch import INTERPRETED, autotune

MAX_WIDTH = 8
# The backward reduces dweight over this many rows per program, so the partial sums are [cdiv(T, 256), W, C] fp32.
BWD_ROWS = 256
# Block of channels of the small per-segment cache kernels (a few rows each).
CACHE_BC = 128

FWD_CONFIGS = [
    triton.Config({"BT": bt, "BC": bc}, num_warps=nw)
    for bt, bc, nw in [(32, 64, 4), (32, 128, 4), (16, 128, 4), (32, 128, 8), (64, 128, 8), (32, 256, 8), (16, 256, 4)]
]
# Both backward kernels spread only channels over the threads (BC = 8 * 32 * num_warps: one 16-byte vector each),
# so the shifted rows [BW, (BT,) BC] and every sum over W and T stay inside a thread: no shared memory in the loops.
# At W = 4 the gradient kernel takes ~168 registers and dx 80-128 (BT 2-4), no spills (Triton 3.6, sm_90).
BWD_GRAD_CONFIGS = [triton.Config({"BC": 256 * nw}, num_warps=nw) for nw in [2, 1, 4]]
BWD_DX_CONFIGS = [
    triton.Config({"BT": bt, "BC": 256 * nw}, num_warps=nw)
    for bt, nw in [(4, 2), (2, 2), (4, 1), (2, 1), (2, 4), (4, 4)]
]


@triton.jit
def _segment_of(cu_seqlens, o_t, N, n_steps):
    """Segment of every row of o_t (or of one row): the last n with cu_seqlens[n] <= t (skips empty segments)."""
    lo = (o_t * 0).to(tl.int32)
    hi = lo + N
    # cu[lo] <= t < cu[hi] holds throughout; ceil(log2(N)) halvings leave hi = lo + 1.
    for _ in range(n_steps):
        mid = (lo + hi) // 2
        below = tl.load(cu_seqlens + mid) <= o_t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _input(x, stride_x, cache, bos, i_n, m, m_r, o_c, m_c, C: tl.constexpr, W: tl.constexpr,
           HAS_CACHE: tl.constexpr):
    """u_m of segment i_n at relative rows m: x[bos + m] for m >= 0, cache[i_n, W-1+m] for m < 0 (x's rows are
    stride_x elements apart).

    bos, i_n, m and the row mask m_r are [BR, 1] (or [BW, BR, 1]) and broadcast against the channels o_c, m_c [1, BC].
    """
    p_u = x + (bos + m) * stride_x + o_c
    m_u = m_r & (m >= 0)
    if HAS_CACHE:
        # one load from either source: rows before the segment start read the cache
        p_h = cache + (i_n * (W - 1) + W - 1 + m) * C + o_c
        p_u = tl.where(m >= 0, p_u, p_h.to(p_u.dtype))
        m_u = m_r
    return tl.load(p_u, mask=m_u & m_c, other=0).to(tl.float32)  # [BR, BC] (or [BW, BR, BC])


@triton.jit
def _preact(x, stride_x, weight, cache, bos, i_n, r, m_r, o_c, m_c, C: tl.constexpr, W: tl.constexpr,
            HAS_CACHE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Conv output before the SiLU at relative rows r: a_r = sum_j w_j u_{r-W+1+j}; 0 where m_r is false.

    bos, i_n (or scalars), r and m_r are [BR, 1]; o_c and m_c are [1, BC].
    """
    b_a = tl.zeros([BR, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0).to(tl.float32)  # [1, BC]
        b_a += _input(x, stride_x, cache, bos, i_n, r - (W - 1) + j, m_r, o_c, m_c, C, W, HAS_CACHE) * b_w
    return b_a  # [BR, BC]


@triton.jit
def _silu_grad(b_a, b_dy):
    """dy * d SiLU(a) / da = dy * sigma(a) * (1 + a * (1 - sigma(a)))."""
    b_s = tl.sigmoid(b_a)
    return b_dy * b_s * (1 + b_a * (1 - b_s))


@autotune(FWD_CONFIGS, key=["C", "W", "HAS_CACHE"])
@triton.jit
def short_conv_fwd_kernel_out(x, stride_x, weight, cu_seqlens, cache, y, T, N, n_steps, C: tl.constexpr,
                              W: tl.constexpr,
                              HAS_CACHE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """y [T, C] over a grid (T-blocks, C-blocks): every row finds its segment, reads its W inputs, applies SiLU."""
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    i_n = _segment_of(cu_seqlens, o_t, N, n_steps)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    b_a = _preact(x, stride_x, weight, cache, bos[:, None], i_n[:, None], (o_t - bos)[:, None], m_t[:, None],
                  o_c[None, :], m_c[None, :], C, W, HAS_CACHE, BT, BC)
    b_y = b_a * tl.sigmoid(b_a)
    tl.store(y + o_t[:, None] * C + o_c[None, :], b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def short_conv_fwd_kernel_cache(x, stride_x, cu_seqlens, cache, new_cache, C: tl.constexpr, W: tl.constexpr,
                                HAS_CACHE: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """new_cache[n, k] = u_{L-W+1+k} of segment n over a grid (N, C-blocks)."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BW)
    o_c = i_c * BC + tl.arange(0, BC)
    m_k, m_c = o_k < W - 1, o_c < C
    b_u = _input(x, stride_x, cache, bos, i_n, (eos - bos - (W - 1) + o_k)[:, None], m_k[:, None], o_c[None, :],
                 m_c[None, :], C, W, HAS_CACHE)  # [BW, BC]
    p_o = new_cache + (i_n * (W - 1) + o_k)[:, None] * C + o_c[None, :]
    tl.store(p_o, b_u.to(new_cache.dtype.element_ty), mask=m_k[:, None] & m_c[None, :])


@autotune(BWD_GRAD_CONFIGS, key=["C", "W", "HAS_CACHE"])
@triton.jit
def short_conv_bwd_kernel_grad(x, stride_x, weight, cu_seqlens, cache, dy, g, dw_part, T, N, n_steps,
                               C: tl.constexpr,
                               W: tl.constexpr, HAS_CACHE: tl.constexpr, BW: tl.constexpr, ROWS: tl.constexpr,
                               BC: tl.constexpr):
    """g = dy * SiLU'(a) [T, C] and dweight partial sums [cdiv(T, ROWS), W, C] over a grid (ROWS-blocks, C-blocks).

    One row at a time: the row's W inputs [BW, BC] give a, and with g the dweight terms g_i u_{i-W+1+j}, summed per
    element (reduced over rows by the launcher). Only channels are spread over the threads, so every sum over W stays
    inside a thread. The segment is a scalar advanced row by row (one bisection per program), and x and dy are
    loaded three rows ahead, so each thread keeps three rows of both in flight while it computes.
    """
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    m_w = o_w < W
    m_wc = m_w[:, None] & m_c[None, :]
    b_w = tl.load(weight + o_c[None, :] * W + o_w[:, None], mask=m_wc, other=0).to(tl.float32)  # [BW, BC]
    b_dw = tl.zeros([BW, BC], dtype=tl.float32)
    t0 = i_p.to(tl.int64) * ROWS
    t1 = tl.minimum(t0 + ROWS, T)
    i_n = _segment_of(cu_seqlens, t0, N, n_steps)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_u = o_w - (W - 1)  # row offsets of u_{i-W+1+j}, j = o_w
    # rows t .. t+2 of x and dy in registers, row t+3 loaded ahead each step (the last rows load themselves again)
    b_x0 = tl.load(x + t0 * stride_x + o_c, mask=m_c, other=0)
    b_x1 = tl.load(x + tl.minimum(t0 + 1, t1 - 1) * stride_x + o_c, mask=m_c, other=0)
    b_x2 = tl.load(x + tl.minimum(t0 + 2, t1 - 1) * stride_x + o_c, mask=m_c, other=0)
    b_dy0 = tl.load(dy + t0 * C + o_c, mask=m_c, other=0)
    b_dy1 = tl.load(dy + tl.minimum(t0 + 1, t1 - 1) * C + o_c, mask=m_c, other=0)
    b_dy2 = tl.load(dy + tl.minimum(t0 + 2, t1 - 1) * C + o_c, mask=m_c, other=0)
    for t in range(t0, t1):
        t_ahead = tl.minimum(t + 3, t1 - 1)
        b_x3 = tl.load(x + t_ahead * stride_x + o_c, mask=m_c, other=0)
        b_dy3 = tl.load(dy + t_ahead * C + o_c, mask=m_c, other=0)
        # skips empty segments too
        while eos <= t:
            i_n += 1
            bos = eos
            eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        m = t - bos + o_u  # relative to the segment start
        # rows t-W+1 .. t-1 of the segment again (L1 hits: loaded ahead in earlier steps), row t from the registers
        m_prev = m_wc & ((o_w < W - 1) & (m >= 0))[:, None]
        b_prev = tl.load(x + (t + o_u)[:, None] * stride_x + o_c[None, :], mask=m_prev, other=0)
        b_u = tl.where((o_w == W - 1)[:, None], b_x0[None, :], b_prev).to(tl.float32)  # [BW, BC]
        if HAS_CACHE:
            if t - bos < W - 1:
                p_h = cache + (i_n * (W - 1) + W - 1 + m)[:, None] * C + o_c[None, :]
                b_u += tl.load(p_h, mask=m_wc & (m < 0)[:, None], other=0).to(tl.float32)
        b_g = _silu_grad(tl.sum(b_u * b_w, 0), b_dy0.to(tl.float32))  # [BC]
        tl.store(g + t * C + o_c, b_g.to(g.dtype.element_ty), mask=m_c)
        b_dw += b_g[None, :] * b_u
        b_x0, b_x1, b_x2 = b_x1, b_x2, b_x3
        b_dy0, b_dy1, b_dy2 = b_dy1, b_dy2, b_dy3
    p_dw = dw_part + (i_p * W + o_w)[:, None].to(tl.int64) * C + o_c[None, :]
    tl.store(p_dw, b_dw, mask=m_wc)


@autotune(BWD_DX_CONFIGS, key=["C", "W", "HAS_DNC"])
@triton.jit
def short_conv_bwd_kernel_dx(g, weight, cu_seqlens, dnc, dx, stride_dx, T, N, n_steps, C: tl.constexpr,
                             W: tl.constexpr, HAS_DNC: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr,
                             BC: tl.constexpr):
    """dx [T, C] (rows stride_dx elements apart) over a grid (T-blocks, C-blocks): dx_i = sum_s w_{W-1-s} g_{i+s}
    over the rows of i's segment.

    Plus the gradient of the new cache where row i is one of the segment's last W-1.
    """
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    o_s = tl.arange(0, BW)
    b_w = tl.load(weight + o_c[None, :] * W + W - 1 - o_s[:, None], mask=(o_s < W)[:, None] & m_c[None, :], other=0)
    b_w = b_w.to(tl.float32)[:, None, :]  # [BW, 1, BC]: w_{W-1-s}
    # rows of the next segment are loaded too and zeroed after the segment search, which the loads need not wait for
    b_g = tl.load(g + (o_t[None, :] + o_s[:, None])[:, :, None] * C + o_c[None, None, :],
                  mask=((o_t[None, :] + o_s[:, None] < T) & (o_s < W)[:, None])[:, :, None] & m_c[None, None, :],
                  other=0)  # [BW, BT, BC]: g_{i+s}
    i_n = _segment_of(cu_seqlens, o_t, N, n_steps)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    r = o_t - bos
    m_s = (r[None, :] + o_s[:, None] < L)[:, :, None]
    b_dx = tl.sum(tl.where(m_s, b_g.to(tl.float32), 0) * b_w, 0)  # [BT, BC]
    if HAS_DNC:
        o_k = r - (L - (W - 1))  # index into the new cache
        p_dnc = dnc + (i_n * (W - 1) + o_k)[:, None] * C + o_c[None, :]
        b_dx += tl.load(p_dnc, mask=(m_t & (o_k >= 0))[:, None] & m_c[None, :], other=0).to(tl.float32)
    tl.store(dx + o_t[:, None] * stride_dx + o_c[None, :], b_dx.to(dx.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def short_conv_bwd_kernel_dcache(x, stride_x, weight, cu_seqlens, cache, dy, dnc, dcache, C: tl.constexpr,
                                 W: tl.constexpr,
                                 HAS_DNC: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """dcache [N, W-1, C] over a grid (N, C-blocks): cache row k is u_m with m = k-W+1, read by rows k-j, j < W."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_k = tl.arange(0, BW)
    o_c = i_c * BC + tl.arange(0, BC)
    m_k, m_c = o_k < W - 1, o_c < C
    b_dh = tl.zeros([BW, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        r = o_k - j
        m_r = m_k & (r >= 0) & (r < L)
        b_a = _preact(x, stride_x, weight, cache, bos, i_n, r[:, None], m_r[:, None], o_c[None, :], m_c[None, :], C, W,
                      True, BW, BC)
        b_dy = tl.load(dy + (bos + r)[:, None] * C + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0)
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0).to(tl.float32)
        b_dh += _silu_grad(b_a, b_dy.to(tl.float32)) * b_w[None, :]
    if HAS_DNC:
        # a segment shorter than W-1 passes part of its cache on into the new cache
        o_j = o_k - L
        p_dnc = dnc + (i_n * (W - 1) + o_j)[:, None] * C + o_c[None, :]
        b_dh += tl.load(p_dnc, mask=(m_k & (o_j >= 0))[:, None] & m_c[None, :], other=0).to(tl.float32)
    p_o = dcache + (i_n * (W - 1) + o_k)[:, None] * C + o_c[None, :]
    tl.store(p_o, b_dh.to(dcache.dtype.element_ty), mask=m_k[:, None] & m_c[None, :])


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a launcher fills comes from here, so tests can NaN-poison fresh outputs."""
    return torch.empty(shape, dtype=dtype, device=device)


def _bisection_steps(num_segments: int) -> int:
    """ceil(log2(N)): the halvings that narrow [0, N) to one segment."""
    return (num_segments - 1).bit_length()


def short_conv_fwd(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None,
                   output_final_cache: bool) -> tuple[Tensor, Tensor]:
    """Launch the forward: y `[T, C]` and the new cache `[N, W-1, C]` (an empty tensor unless requested)."""
    T, C = x.shape
    W = weight.shape[1]
    N = cu_seqlens.numel() - 1
    y = _empty((T, C), x.dtype, x.device)
    if T > 0:
        def grid(meta):
            return triton.cdiv(T, meta["BT"]), triton.cdiv(C, meta["BC"])

        short_conv_fwd_kernel_out[grid](x, x.stride(0), weight, cu_seqlens, cache, y, T, N, _bisection_steps(N), C=C,
                                        W=W, HAS_CACHE=cache is not None)
    new_cache = x.new_empty(0)
    if output_final_cache:
        new_cache = _empty((N, W - 1, C), x.dtype, x.device)
        short_conv_fwd_kernel_cache[(N, triton.cdiv(C, CACHE_BC))](
            x, x.stride(0), cu_seqlens, cache, new_cache, C=C, W=W, HAS_CACHE=cache is not None,
            BW=triton.next_power_of_2(W - 1), BC=CACHE_BC)
    return y, new_cache


def short_conv_bwd(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None, dy: Tensor,
                   dnc: Tensor | None, need_dcache: bool, dx: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the backward: writes dx `[T, C]` (rows may be strided) and returns dweight `[C, W]` and dcache
    `[N, W-1, C]` (empty unless need_dcache)."""
    T, C = x.shape
    W = weight.shape[1]
    N = cu_seqlens.numel() - 1
    BW = triton.next_power_of_2(W)
    if T > 0:
        n_steps = _bisection_steps(N)
        # g = dL/da in x.dtype: the one extra [T, C] tensor, alive only inside the backward
        g = _empty((T, C), x.dtype, x.device)
        num_parts = triton.cdiv(T, BWD_ROWS)
        dw_part = _empty((num_parts, W, C), torch.float32, x.device)

        def grid_grad(meta):
            return num_parts, triton.cdiv(C, meta["BC"])

        short_conv_bwd_kernel_grad[grid_grad](x, x.stride(0), weight, cu_seqlens, cache, dy, g, dw_part, T, N, n_steps,
                                              C=C, W=W, HAS_CACHE=cache is not None, BW=BW, ROWS=BWD_ROWS)

        def grid_dx(meta):
            return triton.cdiv(T, meta["BT"]), triton.cdiv(C, meta["BC"])

        short_conv_bwd_kernel_dx[grid_dx](g, weight, cu_seqlens, dnc, dx, dx.stride(0), T, N, n_steps, C=C, W=W,
                                          HAS_DNC=dnc is not None, BW=BW)
        dw = dw_part.sum(0).t().to(weight.dtype).contiguous()
    else:
        dw = torch.zeros_like(weight)
    dcache = x.new_empty(0)
    if need_dcache:
        assert cache is not None
        dcache = _empty(tuple(cache.shape), cache.dtype, x.device)
        short_conv_bwd_kernel_dcache[(N, triton.cdiv(C, CACHE_BC))](
            x, x.stride(0), weight, cu_seqlens, cache, dy, dnc, dcache, C=C, W=W, HAS_DNC=dnc is not None,
            BW=triton.next_power_of_2(W - 1), BC=CACHE_BC)
    return dw, dcache


@torch.library.custom_op("momctl::short_conv_varlen", mutates_args=())
def _short_conv_op(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None,
                   output_final_cache: bool) -> tuple[Tensor, Tensor]:
    return short_conv_fwd(x, weight, cu_seqlens, cache, output_final_cache)


@_short_conv_op.register_fake
def _(x, weight, cu_seqlens, cache, output_final_cache):
    N, W = cu_seqlens.shape[0] - 1, weight.shape[1]
    new_cache = x.new_empty(N, W - 1, x.shape[1]) if output_final_cache else x.new_empty(0)
    return x.new_empty(x.shape), new_cache


@torch.library.custom_op("momctl::short_conv_varlen_bwd", mutates_args=("dx",))
def _short_conv_bwd_op(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None, dy: Tensor,
                       dnc: Tensor | None, need_dcache: bool, dx: Tensor) -> tuple[Tensor, Tensor]:
    return short_conv_bwd(x, weight, cu_seqlens, cache, dy, dnc, need_dcache, dx)


@_short_conv_bwd_op.register_fake
def _(x, weight, cu_seqlens, cache, dy, dnc, need_dcache, dx):
    dcache = torch.empty_like(cache) if need_dcache else x.new_empty(0)
    return torch.empty_like(weight), dcache


def _setup_context(ctx, inputs, output):
    x, weight, cu_seqlens, cache, output_final_cache = inputs
    ctx.save_for_backward(x, weight, cu_seqlens, cache)
    ctx.output_final_cache = output_final_cache


def _backward(ctx, dy, dnc):
    x, weight, cu_seqlens, cache = ctx.saved_tensors
    dnc = dnc if ctx.output_final_cache else None
    dx, dw, dcache = short_conv_varlen_bwd(x, weight, cu_seqlens, cache, dy, dnc, ctx.needs_input_grad[3])
    return dx, dw, None, dcache, None


_short_conv_op.register_autograd(_backward, setup_context=_setup_context)


def short_conv_varlen(
    x: Tensor,
    weight: Tensor,
    cu_seqlens: Tensor,
    cache: Tensor | None = None,
    output_final_cache: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Depthwise causal conv + SiLU over packed segments (Triton; no host synchronisation, torch.compile-safe).

    y_i = SiLU(sum_j w[:, j] * u_{i-W+1+j}) inside each segment, where u_{-W+1} .. u_{-1} are the segment's cached
    inputs (zeros without a cache): nothing leaks across a segment boundary. Computed in float32.

    Args:
        x: `[T, C]` inputs (float16, bfloat16 or float32), segments packed along T; rows may be strided (a column
            slice of a wider tensor is read in place).
        weight: `[C, W]` filter, 2 <= W <= 8, any float dtype.
        cu_seqlens: int32/int64 `[N + 1]` offsets from 0 to T, segment n is `x[cu_seqlens[n] : cu_seqlens[n + 1]]`
            (empty segments allowed). Not checked on the device: wrong offsets give wrong outputs.
        cache: `[N, W-1, C]` the W-1 inputs before each segment, or None for zeros.
        output_final_cache: also return each segment's last W-1 inputs (taken from the cache where the segment is
            shorter than W-1; an empty segment hands its cache back).

    Returns:
        y `[T, C]` in x.dtype and the new cache `[N, W-1, C]` in x.dtype (or None); differentiable in x, weight
        and cache, through both outputs.
    """
    _check_inputs(x, weight, cu_seqlens, cache)
    x = x if x.stride(1) == 1 else x.contiguous()  # rows may be strided (a column slice): read in place
    weight, cu_seqlens = weight.contiguous(), cu_seqlens.contiguous()
    cache = None if cache is None else cache.contiguous()
    y, new_cache = torch.ops.momctl.short_conv_varlen(x, weight, cu_seqlens, cache, output_final_cache)
    return y, new_cache if output_final_cache else None


def short_conv_varlen_bwd(
    x: Tensor,
    weight: Tensor,
    cu_seqlens: Tensor,
    cache: Tensor | None,
    dy: Tensor,
    d_new_cache: Tensor | None,
    need_dcache: bool,
    dx: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The backward of `short_conv_varlen` (same x, weight, cu_seqlens, cache), for callers that keep their own
    inputs: the gradients of x, weight and (when need_dcache and a cache is given, else None) the cache, from those of
    y and of the new cache (None: zero). Opaque to torch.compile (custom op momctl::short_conv_varlen_bwd).

    dx: where to write the gradient of x (`[T, C]`, rows may be strided: a column slice of a wider gradient), or
    None for a new tensor.
    """
    x = x if x.stride(1) == 1 else x.contiguous()
    cache = None if cache is None else cache.contiguous()
    need_dcache = cache is not None and need_dcache
    d_new_cache = None if d_new_cache is None else d_new_cache.contiguous()
    if dx is None:
        dx = _empty(tuple(x.shape), x.dtype, x.device)
    assert dx.shape == x.shape and dx.stride(1) == 1, (tuple(dx.shape), dx.stride())
    dw, dcache = torch.ops.momctl.short_conv_varlen_bwd(x, weight.contiguous(), cu_seqlens.contiguous(), cache,
                                                        dy.contiguous(), d_new_cache, need_dcache, dx)
    return dx, dw, dcache if need_dcache else None


def _check_inputs(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None) -> None:
    """ValueError for shapes, dtypes and devices the kernels do not take (shapes only: no device value is read)."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be a float16/bfloat16/float32 [T, C] tensor, got {x.dtype} {tuple(x.shape)}")
    C = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != C or not 2 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"weight must be [C={C}, W] with 2 <= W <= {MAX_WIDTH}, got {tuple(weight.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64 [N + 1] with N >= 1, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    expected = (cu_seqlens.numel() - 1, weight.shape[1] - 1, C)
    if cache is not None and tuple(cache.shape) != expected:
        raise ValueError(f"cache must be [N, W-1, C] = {expected}, got {tuple(cache.shape)}")
    tensors = [x, weight, cu_seqlens] + ([] if cache is None else [cache])
    if any(t.device != x.device for t in tensors):
        devices = [str(t.device) for t in tensors]
        raise ValueError(f"x, weight, cu_seqlens and cache must be on one device, got {devices}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the Triton short conv runs on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}; "
                         "use short_conv_varlen_ref on the CPU")
