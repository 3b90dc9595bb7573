"""Short conv and gated RMSNorm kernels at the MoM layer's real shapes on the GPU (`pytest -m gpu`).

bfloat16 kernels against the float32 references on the same (rounded) inputs, NaN-poisoned outputs, and no host
synchronisation once autotuned. Run this file on its own: CPU test modules collected beside it may switch Triton to
the interpreter for the whole session.
"""

import os

import pytest
import torch
from kernel_checks import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

T, N, C, W = 98304, 160, 3072, 4  # packed positions, segments, q/k/v channels (3 * H * K, H = 4, K = 256), filter
H, V = 4, 256
RTOL = 5e-3
BF16 = torch.bfloat16


def compiled(module):
    """The kernel module, refusing to run interpreted on the GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 was set by another test module: run tests/kernels/test_conv_norm_gpu.py alone")
    return module


@pytest.fixture(scope="module")
def sc():
    from momctl.kernels.conv import short_conv

    return compiled(short_conv)


@pytest.fixture(scope="module")
def gn():
    from momctl.kernels.norm import gated_rmsnorm

    return compiled(gated_rmsnorm)


def poison(monkeypatch, module):
    monkeypatch.setattr(module, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))


def real_offsets(gen):
    """N segments over T positions at random cuts, the first few empty or shorter than the filter."""
    cu = torch.randint(0, T + 1, (N + 1,), generator=gen).sort().values
    cu[0], cu[-1] = 0, T
    cu[1:6] = torch.tensor([0, 0, 1, 3, 5])
    return cu.cummax(0).values.to(torch.int32).cuda()


def conv_inputs(gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen).cuda()

    x, cache = randn(T, C).to(BF16), randn(N, W - 1, C).to(BF16)
    return x, randn(C, W) / W ** 0.5, cache, randn(T, C).to(BF16), randn(N, W - 1, C).to(BF16)


def conv_grads(fn, x, weight, cu, cache, dy, dnc):
    leaves = [t.detach().requires_grad_() for t in (x, weight, cache)]
    y, new_cache = fn(leaves[0], leaves[1], cu, leaves[2], output_final_cache=True)
    grads = torch.autograd.grad((y * dy.to(y.dtype)).sum() + (new_cache * dnc.to(y.dtype)).sum(), leaves)
    return (y, new_cache, *grads)


def test_short_conv_real_shape(sc, gen, monkeypatch):
    from momctl.kernels.conv.naive import short_conv_varlen_ref

    poison(monkeypatch, sc)
    cu = real_offsets(gen)
    x, weight, cache, dy, dnc = conv_inputs(gen)
    out = conv_grads(sc.short_conv_varlen, x, weight, cu, cache, dy, dnc)
    ref = conv_grads(short_conv_varlen_ref, x.float(), weight, cu, cache.float(), dy, dnc)
    assert [t.dtype for t in out] == [BF16, BF16, BF16, torch.float32, BF16]
    for name, actual, expected in zip(["y", "new_cache", "dx", "dweight", "dcache"], out, ref, strict=True):
        try:
            assert_close(actual, expected, RTOL)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def test_short_conv_backward_into_a_column_slice_real_shape(sc, gen):
    """The layer's k and v convs: x a column slice of the projection (rows 2056 apart, as [k | v | gates]) and dx
    written into the same columns of one gradient buffer: the contiguous backward's dweight and dcache bit for bit,
    its dx to one bf16 step (796 of 100M elements were one step apart on an H100, where a later call with a new,
    contiguous dx matched bit for bit), the other columns untouched."""
    cu = real_offsets(gen)
    x, weight, cache, dy, dnc = conv_inputs(gen)
    C1 = 1024
    proj = torch.randn(T, 2 * C1 + 8, generator=gen).to(BF16).cuda()
    view = proj[:, C1:2 * C1]
    d_proj = torch.full_like(proj, float("nan"))
    dx, dw, dcache = sc.short_conv_varlen_bwd(view, weight[:C1], cu, cache[..., :C1], dy[:, :C1], dnc[..., :C1], True,
                                              d_proj[:, C1:2 * C1])
    expected = sc.short_conv_varlen_bwd(view.contiguous(), weight[:C1], cu, cache[..., :C1], dy[:, :C1],
                                        dnc[..., :C1], True)
    assert dx.data_ptr() == d_proj[:, C1:].data_ptr()
    torch.testing.assert_close(dx, expected[0], rtol=2 ** -7, atol=1e-5)
    assert (dx != expected[0]).float().mean() < 1e-4
    assert torch.equal(dw, expected[1]) and torch.equal(dcache, expected[2])
    assert d_proj[:, :C1].isnan().all() and d_proj[:, 2 * C1:].isnan().all()


def test_gated_rmsnorm_real_shape(gn, gen, monkeypatch):
    from momctl.kernels.norm.naive import gated_rmsnorm_ref

    poison(monkeypatch, gn)
    x, gate, dy = (torch.randn(1, T, H, V, generator=gen).cuda().to(BF16) for _ in range(3))
    weight = 1 + 0.1 * torch.randn(V, generator=gen).cuda()
    results = []
    for fn, dtype in [(gn.gated_rmsnorm, BF16), (gated_rmsnorm_ref, torch.float32)]:
        leaves = [t.to(dtype).requires_grad_() for t in (x, gate)] + [weight.clone().requires_grad_()]
        y = fn(*leaves, 1e-6)
        results.append((y, *torch.autograd.grad((y * dy.to(dtype)).sum(), leaves)))
    assert [t.dtype for t in results[0]] == [BF16, BF16, BF16, torch.float32]
    for actual, expected in zip(*results, strict=True):
        assert_close(actual, expected, RTOL)


def test_no_host_sync(sc, gn, gen):
    """Once autotuned, forward and backward of both ops never wait for the device."""
    cu = real_offsets(gen)
    x, weight, cache, dy, dnc = conv_inputs(gen)
    o, gate = x.view(T, 3, H, V)[:, 0].contiguous(), torch.randn(T, H, V, generator=gen).cuda().to(BF16)
    norm_weight = torch.ones(V, device="cuda")

    def step():
        conv_grads(sc.short_conv_varlen, x, weight, cu, cache, dy, dnc)
        leaves = [t.detach().requires_grad_() for t in (o, gate, norm_weight)]
        y = gn.gated_rmsnorm(*leaves, 1e-6)
        torch.autograd.grad(y.float().sum(), leaves)

    step()  # autotuning times configs, which synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_inductor_fullgraph(sc, gn, gen):
    """Both ops inside one torch.compile graph (inductor), forward and backward, match eager."""
    cu = torch.tensor([0, 5, 5, 300, 1000], dtype=torch.int32, device="cuda")
    x = torch.randn(1000, 3 * H * V, generator=gen).cuda().to(BF16)
    weight, cache = torch.randn(3 * H * V, W, generator=gen).cuda(), torch.zeros(4, W - 1, 3 * H * V, device="cuda")
    norm_weight = torch.ones(V, device="cuda")

    def layer(x, weight, cache, norm_weight):
        y, new_cache = sc.short_conv_varlen(x, weight, cu, cache.to(x.dtype), output_final_cache=True)
        q, k, v = y.view(-1, 3, H, V).unbind(1)
        return gn.gated_rmsnorm(v, q, norm_weight, 1e-6), new_cache

    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, cache, norm_weight)]
        out, new_cache = fn(*leaves)
        results.append((out, new_cache, *torch.autograd.grad(out.float().sum() + new_cache.float().sum(), leaves)))
    for actual, expected in zip(*results, strict=True):
        assert_close(actual, expected, 1e-2)
