"""Varlen depthwise causal short convolution + SiLU with cached windows: Triton forward and backward."""
# Shapes: T packed time, C channels, W filter width, N segments, L one segment's length. The math is in README.md.

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common.launch import INTERPRETED, autotune

MAX_WIDTH = 8
# The backward program reduces dweight over this many rows, so the partial sums are [cdiv(T, 256), W, C] fp32.
BWD_ROWS = 256
# Up to this width the backward unrolls its W*W shifted loads; wider filters loop (bounded registers).
UNROLL_MAX_WIDTH = 4
# Block of channels of the small per-segment cache kernels (a few rows each).
CACHE_BC = 128

FWD_CONFIGS = [
    triton.Config({"BT": bt, "BC": bc}, num_warps=nw)
    for bt, bc, nw in [(32, 64, 4), (32, 128, 4), (16, 128, 4), (32, 128, 8), (64, 128, 8), (32, 256, 8), (16, 256, 4)]
]
# The backward holds about W*W+W shifted tiles in flight: at most 16 elements per thread (most at 8-16) keeps
# W=4 within the registers.
BWD_CONFIGS = [
    triton.Config({"BT": bt, "BC": bc}, num_warps=nw)
    for bt, bc, nw in [(32, 64, 4), (16, 128, 4), (32, 128, 8), (16, 256, 8), (64, 64, 8), (8, 256, 4), (16, 64, 4),
                       (8, 128, 4)]
]


@triton.jit
def _segment_of(cu_seqlens, o_t, N, n_steps):
    """Segment of every row of o_t: the last n with cu_seqlens[n] <= t (skips empty segments), by bisection."""
    lo = tl.zeros_like(o_t).to(tl.int32)
    hi = lo + N
    # cu[lo] <= t < cu[hi] holds throughout; ceil(log2(N)) halvings leave hi = lo + 1.
    for _ in range(n_steps):
        mid = (lo + hi) // 2
        below = tl.load(cu_seqlens + mid) <= o_t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _input(x, cache, bos, i_n, m, m_r, o_c, m_c, C: tl.constexpr, W: tl.constexpr, HAS_CACHE: tl.constexpr):
    """u_m of segment i_n for rows [BR] of relative index m: x[bos + m] for m >= 0, cache[i_n, W-1+m] for m < 0."""
    p_u = x + (bos + m)[:, None] * C + o_c[None, :]
    m_u = m_r & (m >= 0)
    if HAS_CACHE:
        # one load from either source: rows before the segment start read the cache
        p_h = cache + (i_n * (W - 1) + W - 1 + m)[:, None] * C + o_c[None, :]
        p_u = tl.where((m >= 0)[:, None], p_u, p_h.to(p_u.dtype))
        m_u = m_r
    return tl.load(p_u, mask=m_u[:, None] & m_c[None, :], other=0).to(tl.float32)  # [BR, BC]


@triton.jit
def _preact(x, weight, cache, bos, i_n, r, m_r, o_c, m_c, C: tl.constexpr, W: tl.constexpr,
            HAS_CACHE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Conv output before the SiLU at relative rows r [BR]: a_r = sum_j w_j u_{r-W+1+j}; 0 where m_r is false."""
    b_a = tl.zeros([BR, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0).to(tl.float32)
        b_a += _input(x, cache, bos, i_n, r - (W - 1) + j, m_r, o_c, m_c, C, W, HAS_CACHE) * b_w[None, :]
    return b_a  # [BR, BC]


@triton.jit
def _silu_grad(b_a, b_dy):
    """dy * d SiLU(a) / da = dy * sigma(a) * (1 + a * (1 - sigma(a)))."""
    b_s = tl.sigmoid(b_a)
    return b_dy * b_s * (1 + b_a * (1 - b_s))


@autotune(FWD_CONFIGS, key=["C", "W", "HAS_CACHE"])
@triton.jit
def short_conv_fwd_kernel_out(x, weight, cu_seqlens, cache, y, T, N, n_steps, C: tl.constexpr, W: tl.constexpr,
                              HAS_CACHE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """y [T, C] over a grid (T-blocks, C-blocks): every row finds its segment, reads its W inputs, applies SiLU."""
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    i_n = _segment_of(cu_seqlens, o_t, N, n_steps)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    b_a = _preact(x, weight, cache, bos, i_n, o_t - bos, m_t, o_c, m_c, C, W, HAS_CACHE, BT, BC)
    b_y = b_a * tl.sigmoid(b_a)
    tl.store(y + o_t[:, None] * C + o_c[None, :], b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def short_conv_fwd_kernel_cache(x, cu_seqlens, cache, new_cache, C: tl.constexpr, W: tl.constexpr,
                                HAS_CACHE: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """new_cache[n, k] = u_{L-W+1+k} of segment n over a grid (N, C-blocks)."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BW)
    o_c = i_c * BC + tl.arange(0, BC)
    m_k, m_c = o_k < W - 1, o_c < C
    b_u = _input(x, cache, bos, i_n, eos - bos - (W - 1) + o_k, m_k, o_c, m_c, C, W, HAS_CACHE)  # [BW, BC]
    p_o = new_cache + (i_n * (W - 1) + o_k)[:, None] * C + o_c[None, :]
    tl.store(p_o, b_u.to(new_cache.dtype.element_ty), mask=m_k[:, None] & m_c[None, :])


@triton.jit
def _shifted_grad(x, weight, cache, dy, bos, i_n, o_t, r, L, s, m_t, o_c, m_c, C: tl.constexpr, W: tl.constexpr,
                  HAS_CACHE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """g_{r+s} = dy * SiLU'(a) at the rows s after r [BT] (0 past the segment end), recomputing a from the inputs."""
    m_s = m_t & (r + s < L)
    b_a = _preact(x, weight, cache, bos, i_n, r + s, m_s, o_c, m_c, C, W, HAS_CACHE, BT, BC)
    b_dy = tl.load(dy + (o_t + s)[:, None] * C + o_c[None, :], mask=m_s[:, None] & m_c[None, :], other=0)
    return _silu_grad(b_a, b_dy.to(tl.float32))  # [BT, BC]


@autotune(BWD_CONFIGS, key=["C", "W", "HAS_CACHE", "HAS_DNC"])
@triton.jit
def short_conv_bwd_kernel_dx(x, weight, cu_seqlens, cache, dy, dnc, dx, dw_part, T, N, n_steps, C: tl.constexpr,
                             W: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_DNC: tl.constexpr, UNROLL: tl.constexpr,
                             BW: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx [T, C] and dweight partial sums [cdiv(T, ROWS), W, C] over a grid (ROWS-blocks, C-blocks).

    dx at relative row i is sum_s w_{W-1-s} g_{i+s} over the segment's rows (g = dy * SiLU'(a), recomputed from x),
    plus the gradient of the new cache where row i is one of the segment's last W-1.
    """
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    b_dw = tl.zeros([BW, BC], dtype=tl.float32)
    row0 = i_p.to(tl.int64) * ROWS
    for i_s in range(0, tl.cdiv(tl.minimum(ROWS, T - row0), BT)):
        o_t = row0 + i_s * BT + tl.arange(0, BT)
        m_t = o_t < T
        i_n = _segment_of(cu_seqlens, o_t, N, n_steps)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        r = o_t - bos
        # s = 0, the block's own rows: they also give dw_j = sum_i g_i u_{i-W+1+j}
        b_g = _shifted_grad(x, weight, cache, dy, bos, i_n, o_t, r, L, 0, m_t, o_c, m_c, C, W, HAS_CACHE, BT, BC)
        b_dx = b_g * tl.load(weight + o_c * W + W - 1, mask=m_c, other=0).to(tl.float32)[None, :]
        for j in tl.static_range(W):
            b_u = _input(x, cache, bos, i_n, r - (W - 1) + j, m_t, o_c, m_c, C, W, HAS_CACHE)
            b_dw += tl.where(o_w[:, None] == j, tl.sum(b_g * b_u, 0)[None, :], 0)
        # Unrolled, every shifted load is in flight at once (fast for small W); a loop bounds the registers.
        if UNROLL:
            for s in tl.static_range(1, W):
                b_g = _shifted_grad(x, weight, cache, dy, bos, i_n, o_t, r, L, s, m_t, o_c, m_c, C, W, HAS_CACHE, BT,
                                    BC)
                b_dx += b_g * tl.load(weight + o_c * W + W - 1 - s, mask=m_c, other=0).to(tl.float32)[None, :]
        else:
            for s in range(1, W):
                b_g = _shifted_grad(x, weight, cache, dy, bos, i_n, o_t, r, L, s, m_t, o_c, m_c, C, W, HAS_CACHE, BT,
                                    BC)
                b_dx += b_g * tl.load(weight + o_c * W + W - 1 - s, mask=m_c, other=0).to(tl.float32)[None, :]
        if HAS_DNC:
            o_k = r - (L - (W - 1))  # index into the new cache
            p_dnc = dnc + (i_n * (W - 1) + o_k)[:, None] * C + o_c[None, :]
            b_dx += tl.load(p_dnc, mask=(m_t & (o_k >= 0))[:, None] & m_c[None, :], other=0).to(tl.float32)
        tl.store(dx + o_t[:, None] * C + o_c[None, :], b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])
    p_dw = dw_part + (i_p * W + o_w)[:, None].to(tl.int64) * C + o_c[None, :]
    tl.store(p_dw, b_dw, mask=(o_w < W)[:, None] & m_c[None, :])


@triton.jit
def short_conv_bwd_kernel_dcache(x, weight, cu_seqlens, cache, dy, dnc, dcache, C: tl.constexpr, W: tl.constexpr,
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
        b_a = _preact(x, weight, cache, bos, i_n, r, m_r, o_c, m_c, C, W, True, BW, BC)
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

        short_conv_fwd_kernel_out[grid](x, weight, cu_seqlens, cache, y, T, N, _bisection_steps(N), C=C, W=W,
                                        HAS_CACHE=cache is not None)
    new_cache = x.new_empty(0)
    if output_final_cache:
        new_cache = _empty((N, W - 1, C), x.dtype, x.device)
        short_conv_fwd_kernel_cache[(N, triton.cdiv(C, CACHE_BC))](
            x, cu_seqlens, cache, new_cache, C=C, W=W, HAS_CACHE=cache is not None,
            BW=triton.next_power_of_2(W - 1), BC=CACHE_BC)
    return y, new_cache


def short_conv_bwd(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None, dy: Tensor,
                   dnc: Tensor | None, need_dcache: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: dx `[T, C]`, dweight `[C, W]` and dcache `[N, W-1, C]` (empty unless need_dcache)."""
    T, C = x.shape
    W = weight.shape[1]
    N = cu_seqlens.numel() - 1
    BW = triton.next_power_of_2(W)
    dx = _empty((T, C), x.dtype, x.device)
    if T > 0:
        num_parts = triton.cdiv(T, BWD_ROWS)
        dw_part = _empty((num_parts, W, C), torch.float32, x.device)

        def grid(meta):
            return num_parts, triton.cdiv(C, meta["BC"])

        short_conv_bwd_kernel_dx[grid](x, weight, cu_seqlens, cache, dy, dnc, dx, dw_part, T, N, _bisection_steps(N),
                                       C=C, W=W, HAS_CACHE=cache is not None, HAS_DNC=dnc is not None,
                                       UNROLL=W <= UNROLL_MAX_WIDTH, BW=BW, ROWS=BWD_ROWS)
        dw = dw_part.sum(0).t().to(weight.dtype).contiguous()
    else:
        dw = torch.zeros_like(weight)
    dcache = x.new_empty(0)
    if need_dcache:
        assert cache is not None
        dcache = _empty(tuple(cache.shape), cache.dtype, x.device)
        short_conv_bwd_kernel_dcache[(N, triton.cdiv(C, CACHE_BC))](
            x, weight, cu_seqlens, cache, dy, dnc, dcache, C=C, W=W, HAS_DNC=dnc is not None,
            BW=triton.next_power_of_2(W - 1), BC=CACHE_BC)
    return dx, dw, dcache


@torch.library.custom_op("momctl::short_conv_varlen", mutates_args=())
def _short_conv_op(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None,
                   output_final_cache: bool) -> tuple[Tensor, Tensor]:
    return short_conv_fwd(x, weight, cu_seqlens, cache, output_final_cache)


@_short_conv_op.register_fake
def _(x, weight, cu_seqlens, cache, output_final_cache):
    N, W = cu_seqlens.shape[0] - 1, weight.shape[1]
    new_cache = x.new_empty(N, W - 1, x.shape[1]) if output_final_cache else x.new_empty(0)
    return torch.empty_like(x), new_cache


@torch.library.custom_op("momctl::short_conv_varlen_bwd", mutates_args=())
def _short_conv_bwd_op(x: Tensor, weight: Tensor, cu_seqlens: Tensor, cache: Tensor | None, dy: Tensor,
                       dnc: Tensor | None, need_dcache: bool) -> tuple[Tensor, Tensor, Tensor]:
    return short_conv_bwd(x, weight, cu_seqlens, cache, dy, dnc, need_dcache)


@_short_conv_bwd_op.register_fake
def _(x, weight, cu_seqlens, cache, dy, dnc, need_dcache):
    dcache = torch.empty_like(cache) if need_dcache else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), dcache


def _setup_context(ctx, inputs, output):
    x, weight, cu_seqlens, cache, output_final_cache = inputs
    ctx.save_for_backward(x, weight, cu_seqlens, cache)
    ctx.output_final_cache = output_final_cache


def _backward(ctx, dy, dnc):
    x, weight, cu_seqlens, cache = ctx.saved_tensors
    need_dcache = cache is not None and ctx.needs_input_grad[3]
    dnc = dnc.contiguous() if ctx.output_final_cache and dnc is not None else None
    dx, dw, dcache = torch.ops.momctl.short_conv_varlen_bwd(x, weight, cu_seqlens, cache, dy.contiguous(), dnc,
                                                            need_dcache)
    return dx, dw, None, dcache if need_dcache else None, None


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
        x: `[T, C]` inputs (float16, bfloat16 or float32), segments packed along T.
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
    x, weight, cu_seqlens = x.contiguous(), weight.contiguous(), cu_seqlens.contiguous()
    cache = None if cache is None else cache.contiguous()
    y, new_cache = torch.ops.momctl.short_conv_varlen(x, weight, cu_seqlens, cache, output_final_cache)
    return y, new_cache if output_final_cache else None


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
