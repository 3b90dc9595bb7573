"""Every autotune config of every chunk-rule kernel, pinned one at a time, against the reference.

Autotuning picks a config by speed, on whichever GPU runs it, so a config that computes something wrong (a compiler
bug that hits one tiling or warp count, as Triton 3.4-3.7 on Hopper is known to have) would pass every other test on
the machine whose autotuner happened to pick another. On the CPU (interpreter) this checks the kernels' indexing for
each config's block sizes; on the GPU (`pytest -m gpu`) the same test runs the compiled configs at real head sizes.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, assert_close

from momctl.kernels.common import chunk_output, chunk_state, cumsum, l2norm, state_passes
from momctl.kernels.gated import chunk_gated_rule
from momctl.kernels.gated.naive import chunk_gated_rule_ref
from momctl.kernels.gated_delta import chunk_gated_delta_rule, wy
from momctl.kernels.gated_delta.naive import chunk_gated_delta_rule_ref

GPU = DEVICE == "cuda"
pytestmark = pytest.mark.gpu if GPU else []
TUNERS = {name: obj for module in (chunk_output, chunk_state, l2norm, wy)
          for name, obj in vars(module).items() if hasattr(obj, "all_configs")}
CASES = [(name, i) for name, tuner in sorted(TUNERS.items()) for i in range(len(tuner.all_configs))]
# Segments: ragged, one token, empty, exactly one chunk, more than one chunk.
LENGTHS = [300, 1, 0, 64, 517, 0, 65] if GPU else [30, 1, 0, 64, 70, 0]
RTOL = 5e-3 if GPU else 1e-4  # bf16 against fp32 on the GPU; fp32 against fp64 on the CPU


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element a config leaves unwritten fails the comparison."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (chunk_output, chunk_state, cumsum, l2norm, state_passes, wy):
        monkeypatch.setattr(module, "_empty", nan_empty)


@pytest.fixture
def pinned(request):
    """Pin one tuner to one of its configs (a tuner with one config runs it without timing or pruning)."""
    name, i = request.param
    tuner = TUNERS[name]
    configs = tuner.configs
    tuner.configs = [tuner.all_configs[i]]
    yield name
    tuner.configs = configs


def rule_inputs(delta, K, gen):
    """q, k, v, beta (None without delta), g, h0 as leaves: bf16 q/k/v/beta on the GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if GPU else torch.float32
    T, N, H = sum(LENGTHS), len(LENGTHS), 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = (randn(1, T, H, K).to(dtype) for _ in range(3))
    beta = torch.rand(1, T, H, generator=gen).to(dtype) if delta else None
    g = -torch.rand(H, generator=gen).mul(2).exp() * F.softplus(randn(1, T, H) - 2)
    h0 = randn(N, H, K, K)
    return [None if x is None else x.to(DEVICE).requires_grad_() for x in (q, k, v, beta, g, h0)]


def outputs_and_grads(fn, inputs, delta, cu):
    q, k, v, beta, g, h0 = inputs
    args = (q, k, v, beta, g) if delta else (q, k, v, g)
    o, s = fn(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(1)
    grad_o = torch.randn(o.shape, generator=gen).to(o.dtype).to(DEVICE)
    grad_s = torch.randn(s.shape, generator=gen).to(DEVICE)
    leaves = [x for x in inputs if x is not None]
    return [o, s, *torch.autograd.grad((o.float() * grad_o.float()).sum() + (s * grad_s).sum(), leaves)]


@pytest.mark.parametrize("K", [64, 256] if GPU else [32])
@pytest.mark.parametrize("pinned", CASES, indirect=True, ids=[f"{n}-{i}" for n, i in CASES])
@pytest.mark.parametrize("rule", ["gated_delta", "gated"])
def test_config_matches_reference(rule, pinned, K):
    delta = rule == "gated_delta"
    if not delta and pinned.startswith("wy_"):
        pytest.skip("the gated rule has no WY kernels")
    kernel, reference = (chunk_gated_delta_rule, chunk_gated_delta_rule_ref) if delta else \
        (chunk_gated_rule, chunk_gated_rule_ref)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=DEVICE)
    inputs = rule_inputs(delta, K, torch.Generator().manual_seed(0))
    actual = outputs_and_grads(kernel, inputs, delta, cu)
    exact = [None if x is None else x.detach().to(torch.float32 if GPU else torch.float64).requires_grad_()
             for x in inputs]
    expected = outputs_and_grads(reference, exact, delta, cu)
    names = ["o", "state"] + [n for n, x in zip(["dq", "dk", "dv", "dbeta", "dg", "dh0"], inputs, strict=True)
                              if x is not None]
    for name, a, e in zip(names, actual, expected, strict=True):
        try:
            assert_close(a, e.to(a.dtype), RTOL)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
