"""WY/UT kernels (kernels/gated_delta/wy.py) compiled on the GPU at model shapes: bf16 inputs against the fp32
reference, forward and backward; NaN-poisoned outputs; no host synchronisation.

    pytest -m gpu tests/kernels/test_wy_gpu.py      # the checks
    python tests/kernels/test_wy_gpu.py             # timings at the real shape (T ~ 98k, 160 segments, H 4, K V 256)
"""

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_close

from momctl.kernels.common.varlen import chunk_layout
from momctl.kernels.gated_delta.naive import wy_repr_ref

CHUNK = 64
RTOL = 5e-3  # bf16 outputs: their own rounding is ~1.7e-3


def segment_lengths(gen, total, num_segments):
    """num_segments lengths summing to total: the edge cases first (empty, 1, around one and two chunks), then
    random lengths."""
    edge = [0, 1, 2, 63, 64, 65, 127, 128, 129]
    rest = total - sum(edge)
    n = num_segments - len(edge)
    cuts = torch.sort(torch.randint(0, rest + 1, (n - 1,), generator=gen)).values.tolist()
    return edge + [b - a for a, b in zip([0, *cuts], [*cuts, rest], strict=True)]


def make_inputs(gen, lengths, H, K, V, gated, dtype=torch.bfloat16):
    """cu_seqlens, k (unit rows), v, beta, g_cum (fp32 chunk-local cumsum of log decays, or None) on the GPU."""
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1).to("cuda", dtype)
    v = torch.randn(1, T, H, V, generator=gen).to("cuda", dtype)
    beta = torch.rand(1, T, H, generator=gen).to("cuda", dtype)
    g_cum = None
    if gated:
        g = F.logsigmoid(torch.randn(1, T, H, generator=gen, dtype=torch.float64)).cuda()
        t = torch.arange(T, device="cuda")
        seg_start = cu[torch.searchsorted(cu[1:], t, right=True)].long()
        chunk_start = seg_start + (t - seg_start) // CHUNK * CHUNK
        cs = torch.cat([g.new_zeros(1, 1, H), g.cumsum(1)], 1)  # cs[:, t] = sum of g before t
        g_cum = (cs[:, t + 1] - cs[:, chunk_start]).float()
    return cu, k, v, beta, g_cum


def reference(k, v, beta, g_cum, cu, dw, du, dtype=torch.float32):
    """(w, u, A_inv) of the reference and its gradients of sum(w * dw) + sum(u * du), computed in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (k, v, beta)]
    if g_cum is not None:
        leaves.append(g_cum.detach().to(dtype).requires_grad_())
    w, u, A_inv = wy_repr_ref(*leaves[:3], leaves[3] if g_cum is not None else None, cu_seqlens=cu)
    grads = torch.autograd.grad((w * dw.to(dtype)).sum() + (u * du.to(dtype)).sum(), leaves)
    return (w, u, A_inv), grads


@pytest.fixture
def wy(monkeypatch):
    """The kernel module, compiled, with NaN-poisoned output buffers (imported here: collecting this file on a CPU
    machine must not import triton before a CPU test module sets TRITON_INTERPRET=1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 was set by another test module: run tests/kernels/test_wy_gpu.py alone")
    from momctl.kernels.gated_delta import wy

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # an fp32 reference, not a TF32 one
    monkeypatch.setattr(wy, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))
    return wy


def check_against_reference(wy, gen, lengths, H, K, V, gated, dtype=torch.bfloat16, grad_dtype=None, rtol=RTOL,
                            ref_dtype=torch.float32):
    cu, k, v, beta, g_cum = make_inputs(gen, lengths, H, K, V, gated, dtype)
    layout = chunk_layout(cu, 1, k.shape[1], CHUNK, k.device)
    w, u, A_inv = wy.wy_fwd(k, v, beta, g_cum, layout)
    grad_dtype = dtype if grad_dtype is None else grad_dtype
    dw = torch.randn(w.shape, generator=gen).to("cuda", grad_dtype)
    du = torch.randn(u.shape, generator=gen).to("cuda", grad_dtype)
    dk, dv, dbeta, dg = wy.wy_bwd(k, v, beta, g_cum, A_inv, dw, du, layout)
    (w_ref, u_ref, A_ref), grads_ref = reference(k, v, beta, g_cum, cu, dw, du, ref_dtype)
    assert (dg is None) == (g_cum is None)
    got = {"w": w, "u": u, "A_inv": A_inv, "dk": dk, "dv": dv, "dbeta": dbeta, "dg_cum": dg}
    want = {"w": w_ref, "u": u_ref, "A_inv": A_ref, "dk": grads_ref[0], "dv": grads_ref[1], "dbeta": grads_ref[2],
            "dg_cum": grads_ref[3] if gated else None}
    for name in got:
        if got[name] is not None:
            try:
                assert_close(got[name], want[name], rtol)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("K", [64, 128, 256])
def test_bf16_matches_fp32_reference(wy, gen, K, gated):
    check_against_reference(wy, gen, segment_lengths(gen, 16384, 40), 4, K, K, gated)


@pytest.mark.gpu
def test_real_shape(wy, gen):
    """The training shape: ~98k packed positions in 160 segments, H 4, K = V = 256, bf16."""
    check_against_reference(wy, gen, segment_lengths(gen, 98304, 160), 4, 256, 256, True)


@pytest.mark.gpu
def test_fp32_upstream_gradients_on_the_bf16_path(wy, gen):
    check_against_reference(wy, gen, segment_lengths(gen, 4096, 16), 4, 128, 128, True, grad_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False])
def test_fp32_inputs_are_exact(wy, gen, gated):
    """fp32 inputs take the "ieee" dots: close to an fp64 reference, no TF32 anywhere."""
    check_against_reference(wy, gen, segment_lengths(gen, 2048, 12), 4, 64, 128, gated, dtype=torch.float32, rtol=1e-5,
                            ref_dtype=torch.float64)


@pytest.mark.gpu
def test_no_host_sync(wy, gen):
    cu, k, v, beta, g_cum = make_inputs(gen, segment_lengths(gen, 8192, 20), 4, 128, 128, True)
    leaves = [x.clone().requires_grad_() for x in (k, v, beta, g_cum)]

    def step():
        w, u, _ = wy.wy_repr(*leaves, cu_seqlens=cu)
        (w.float().sum() + u.float().sum()).backward()

    step()  # autotuning times the configs: it synchronises, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(x.grad.isfinite().all() for x in leaves)


def benchmark():
    """Forward and backward time at the training shape, with the DRAM traffic each implies."""
    from triton.testing import do_bench

    from momctl.kernels.gated_delta import wy

    gen = torch.Generator().manual_seed(0)
    H, K, V = 4, 256, 256
    cu, k, v, beta, g_cum = make_inputs(gen, segment_lengths(gen, 98304, 160), H, K, V, True)
    T = k.shape[1]
    layout = chunk_layout(cu, 1, T, CHUNK, k.device)
    w, u, A_inv = wy.wy_fwd(k, v, beta, g_cum, layout)
    dw, du = torch.randn_like(w), torch.randn_like(u)
    wy.wy_bwd(k, v, beta, g_cum, A_inv, dw, du, layout)
    fwd = do_bench(lambda: wy.wy_fwd(k, v, beta, g_cum, layout))
    bwd = do_bench(lambda: wy.wy_bwd(k, v, beta, g_cum, A_inv, dw, du, layout))
    gb = 2 * T * H * (K + V) / 1e9  # one bf16 [T, H, K] plus one [T, H, V]
    a_gb = 4 * T * H * CHUNK / 1e9
    print(f"{torch.cuda.get_device_name()}  T={T} segments={len(cu) - 1} H={H} K={K} V={V} bf16")
    print(f"wy_fwd {fwd * 1e3:8.1f} us  {(2 * gb + a_gb) / fwd * 1e3:6.0f} GB/s  (k, v in; w, u, A_inv out)")
    print(f"wy_bwd {bwd * 1e3:8.1f} us  {(3 * gb + a_gb) / bwd * 1e3:6.0f} GB/s  (k, v, dw, du, A_inv in; dk, dv out)")
    print("configs:", wy.wy_fwd_kernel.best_config, "|", wy.wy_bwd_kernel.best_config)


if __name__ == "__main__":
    benchmark()
