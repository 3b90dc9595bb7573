"""The Triton varlen short conv against the reference (interpreted on the CPU): outputs, new cache, every gradient."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, assert_close

from momctl.kernels.conv import short_conv as sc
from momctl.kernels.conv.naive import short_conv_varlen_ref
from momctl.modules import short_conv

F64 = torch.float64
RTOL = {torch.float32: 1e-5}
LENGTHS = [0, 1, 2, 3, 17, 40]  # shorter than the filter, empty, several blocks


@pytest.fixture
def poison(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element no kernel writes fails the comparison."""
    monkeypatch.setattr(sc, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def make_inputs(gen, lengths, C, W, with_cache):
    """x [T, C], weight [C, W], cache [N, W-1, C] (or None), and upstream gradients for y and the new cache."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(DEVICE)

    T, N = sum(lengths), len(lengths)
    cache = randn(N, W - 1, C) if with_cache else None
    return randn(T, C), randn(C, W) / W ** 0.5, cache, randn(T, C), randn(N, W - 1, C)


def run(fn, x, weight, cu, cache, dy, dnc, dtype, final=True):
    """Outputs and gradients (x, weight, cache) of fn on copies of the inputs cast to dtype."""
    leaves = [t if t is None else t.to(dtype).requires_grad_() for t in (x, weight, cache)]
    y, new_cache = fn(*leaves[:2], cu, leaves[2], output_final_cache=final)
    loss = (y * dy.to(dtype)).sum() + ((new_cache * dnc.to(dtype)).sum() if final else 0)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return y, new_cache, grads


def check_against_reference(gen, lengths, C, W, with_cache, final=True, cu_dtype=torch.int32):
    x, weight, cache, dy, dnc = make_inputs(gen, lengths, C, W, with_cache)
    cu = offsets(lengths, cu_dtype)
    y_ref, nc_ref, g_ref = run(short_conv_varlen_ref, x, weight, cu, cache, dy, dnc, F64, final)
    y, nc, g = run(sc.short_conv_varlen, x, weight, cu, cache, dy, dnc, torch.float32, final)
    tol = RTOL[torch.float32]
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert_close(y, y_ref, tol)
    if final:
        assert nc.dtype == torch.float32
        assert_close(nc, nc_ref, tol)
    else:
        assert nc is None
    for actual, expected in zip(g, g_ref, strict=True):
        assert_close(actual, expected, tol)


def test_reference_matches_module_short_conv(gen):
    """The packed reference computes momctl.modules.short_conv (padded [N, L, C]) segment by segment."""
    C, W = 6, 4
    x, weight, cache, _, _ = make_inputs(gen, LENGTHS, C, W, True)
    y, new_cache = short_conv_varlen_ref(x, weight, offsets(LENGTHS), cache, output_final_cache=True)
    padded = x.new_zeros(len(LENGTHS), max(LENGTHS), C)
    for n, (segment, L) in enumerate(zip(x.split(LENGTHS), LENGTHS, strict=True)):
        padded[n, :L] = segment
    y_mod, cache_mod = short_conv(padded, weight, cache, torch.tensor(LENGTHS, device=DEVICE))
    assert_close(y, torch.cat([y_mod[n, :L] for n, L in enumerate(LENGTHS)]), 1e-12)
    assert_close(new_cache, cache_mod, 1e-12)
    y0, _ = short_conv_varlen_ref(x, weight, offsets(LENGTHS))  # no cache = zeros
    assert_close(y0, short_conv_varlen_ref(x, weight, offsets(LENGTHS), torch.zeros_like(cache))[0], 0)
    assert_close(y0[:1], F.silu(x[:1] * weight[:, -1]), 1e-12)  # first row of the first non-empty segment


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("W,C", [(4, 20), (3, 48), (2, 48)])
def test_matches_reference(gen, poison, W, C, with_cache):
    check_against_reference(gen, LENGTHS, C, W, with_cache)


def test_wide_filter_loops(gen, poison):
    """W = 8 takes the looped (not unrolled) backward; segments of 0..7 sit inside one filter window."""
    check_against_reference(gen, [5, 0, 7, 30, 2], 20, 8, True, cu_dtype=torch.int64)


@pytest.mark.parametrize("rows", [3, 8])
@pytest.mark.parametrize("W", [4, 8])
def test_backward_row_blocks_cut_segments(gen, poison, monkeypatch, rows, W):
    """The backward's row blocks (256 rows on the GPU) cut through segments, several times within one filter
    window when a block is shorter than W: each block's dweight partial sums its own rows only, and dx reads g
    across block boundaries."""
    monkeypatch.setattr(sc, "BWD_ROWS", rows)
    check_against_reference(gen, [0, 1, 2, 3, 17, 40, 0, 9], 20, W, True)


def test_without_final_cache(gen, poison):
    check_against_reference(gen, [9, 0, 3, 25], 20, 4, True, final=False)


def test_only_empty_segments(gen, poison):
    """No positions at all: y is empty, each cache is handed back and its gradient is the new cache's."""
    check_against_reference(gen, [0, 0], 20, 4, True)


def test_strided_rows_are_read_in_place(gen, poison):
    """x as a column slice of a wider tensor (rows strided, as the layer passes k and v out of one projection):
    same outputs and gradients as a contiguous copy, and the slice is not copied."""
    W, lengths = 4, [0, 2, 19, 6]
    x, weight, cache, dy, dnc = make_inputs(gen, lengths, 20, W, True)
    wide = torch.cat([x.new_zeros(x.shape[0], 5), x, x.new_zeros(x.shape[0], 7)], 1).float().requires_grad_()
    x_view = wide[:, 5:25]
    weight, cache = weight.float().requires_grad_(), cache.float().requires_grad_()
    y, nc = sc.short_conv_varlen(x_view, weight, offsets(lengths), cache, output_final_cache=True)
    grads = torch.autograd.grad((y * dy.float()).sum() + (nc * dnc.float()).sum(), [wide, weight, cache])
    y_ref, nc_ref, g_ref = run(short_conv_varlen_ref, x, weight, offsets(lengths), cache, dy, dnc, F64)
    assert_close(y, y_ref, 1e-5)
    assert_close(nc, nc_ref, 1e-5)
    assert_close(grads[0][:, 5:25], g_ref[0], 1e-5)
    assert grads[0][:, :5].abs().sum() == 0 and grads[0][:, 25:].abs().sum() == 0
    for actual, expected in zip(grads[1:], g_ref[1:], strict=True):
        assert_close(actual, expected, 1e-5)


def test_chunked_equals_whole(gen, poison):
    """Every segment in two pieces, the second starting from the first's cache == one call (and gradients)."""
    W, C, lengths = 4, 20, [1, 2, 9, 30]
    cuts = [0, 1, 2, 13]  # first pieces of 0, 1, 2, 13 positions (shorter than the window, too)
    x, weight, cache, dy, dnc = make_inputs(gen, lengths, C, W, True)
    x, weight, cache = (t.float().requires_grad_() for t in (x, weight, cache))
    dy, dnc = dy.float(), dnc.float()
    y, new_cache = sc.short_conv_varlen(x, weight, offsets(lengths), cache, output_final_cache=True)
    whole = torch.autograd.grad((y * dy).sum() + (new_cache * dnc).sum(), [x, weight, cache])

    segments, dys = x.split(lengths), dy.split(lengths)
    first = torch.cat([s[:k] for s, k in zip(segments, cuts, strict=True)])
    second = torch.cat([s[k:] for s, k in zip(segments, cuts, strict=True)])
    y1, mid = sc.short_conv_varlen(first, weight, offsets(cuts), cache, output_final_cache=True)
    rest = [L - k for L, k in zip(lengths, cuts, strict=True)]
    y2, end = sc.short_conv_varlen(second, weight, offsets(rest), mid, output_final_cache=True)
    pieces = [torch.cat([a, b]) for a, b in zip(y1.split(cuts), y2.split(rest), strict=True)]
    assert_close(torch.cat(pieces), y.detach(), 1e-6)
    assert_close(end, new_cache.detach(), 0)
    dy1 = torch.cat([d[:k] for d, k in zip(dys, cuts, strict=True)])
    dy2 = torch.cat([d[k:] for d, k in zip(dys, cuts, strict=True)])
    chunked = torch.autograd.grad((y1 * dy1).sum() + (y2 * dy2).sum() + (end * dnc).sum(), [x, weight, cache])
    for actual, expected in zip(chunked, whole, strict=True):
        assert_close(actual, expected, 1e-5)


def test_compiles_fullgraph(gen):
    """The custom op traces into one graph (forward and backward) and computes what eager does."""
    W, C, lengths = 4, 20, [3, 0, 10]
    x, weight, cache, dy, dnc = make_inputs(gen, lengths, C, W, True)
    cu = offsets(lengths)

    def fn(x, weight, cu, cache, output_final_cache):
        return sc.short_conv_varlen(x, weight, cu, cache, output_final_cache)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y, nc, g = run(compiled, x, weight, cu, cache, dy, dnc, torch.float32)
    y_eager, nc_eager, g_eager = run(fn, x, weight, cu, cache, dy, dnc, torch.float32)
    assert_close(y, y_eager, 0)
    assert_close(nc, nc_eager, 0)
    for actual, expected in zip(g, g_eager, strict=True):
        assert_close(actual, expected, 0)


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.zeros(20, 9)), "2 <= W <= 8"),
    (dict(weight=torch.zeros(21, 4)), "weight must be"),
    (dict(x=torch.zeros(5, 20, dtype=F64)), "x must be"),
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), "cu_seqlens must be"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "cu_seqlens must be"),
    (dict(cache=torch.zeros(1, 2, 20)), "cache must be"),
])
def test_bad_inputs(change, match):
    args = dict(x=torch.zeros(5, 20), weight=torch.zeros(20, 4), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                cache=torch.zeros(1, 3, 20))
    with pytest.raises(ValueError, match=match):
        sc.short_conv_varlen(**{k: v.to(DEVICE) for k, v in (args | change).items()})


def test_reference_rejects_bad_offsets():
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        short_conv_varlen_ref(torch.zeros(5, 2), torch.zeros(2, 4), torch.tensor([0, 6, 5]))
