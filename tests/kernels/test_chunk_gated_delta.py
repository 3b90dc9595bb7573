"""The Triton chunk kernels of the gated delta rule (and the delta rule) against the fp64 loop reference: output,
final state and every gradient, under TRITON_INTERPRET=1 on the CPU (compiled kernels when CUDA is there)."""

import kernel_checks as checks
import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE

from momctl.kernels.common import state_passes
from momctl.kernels.gated_delta import chunk_gated_delta_rule
from momctl.kernels.gated_delta.naive import recurrent_gated_delta_rule_ref

pytestmark = pytest.mark.usefixtures("poison_chunk_buffers")
F64 = torch.float64
RTOL = 1e-4 if DEVICE == "cpu" else 5e-3
RULES = ["gated_delta", "delta"]  # g given / g=None
CASES = {  # name: (B, T, H, K, V, init, use_qk_l2norm, dtype)
    "T1": (2, 1, 2, 16, 32, True, True, torch.float32),
    "T17": (1, 17, 1, 32, 16, False, True, torch.float32),
    "T64_no_l2norm": (2, 64, 2, 16, 16, True, False, torch.float32),
    "T65_f64_inputs": (1, 65, 1, 32, 32, True, True, F64),
    "T130": (1, 130, 2, 16, 16, False, True, torch.float32),
    "T40_K24_V20": (1, 40, 1, 24, 20, True, True, torch.float32),  # dims that are not powers of two
}


def make_inputs(gen, B, T, H, K, V, rule, init=True, N=None, dtype=torch.float32, g_value=None):
    """Leaves q, k, v, beta, g (None for the delta rule), initial_state (None unless init), requiring grad."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64).to(dtype)
    g = F.logsigmoid(randn(B, T, H)) if rule == "gated_delta" else None
    if g is not None and g_value is not None:
        g = torch.full_like(g, g_value)
    h0 = randn(B if N is None else N, H, K, V) if init else None
    return [None if x is None else x.to(DEVICE).requires_grad_() for x in (q, k, v, beta, g, h0)]


def check_against_reference(gen, inputs, N, floors=None, **kw):
    checks.check_against_reference(gen, chunk_gated_delta_rule, recurrent_gated_delta_rule_ref, inputs, N, RTOL,
                                   floors, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rule", RULES)
def test_matches_reference(gen, rule, case):
    B, T, H, K, V, init, use_qk_l2norm, dtype = CASES[case]
    inputs = make_inputs(gen, B, T, H, K, V, rule, init, dtype=dtype)
    check_against_reference(gen, inputs, B, use_qk_l2norm=use_qk_l2norm)



@pytest.mark.parametrize("case", ["T1", "T40_K24_V20", "T65_f64_inputs"])
@pytest.mark.parametrize("rule", RULES)
def test_state_passes_over_value_slices(gen, monkeypatch, rule, case):
    """The state passes over slices of 16 value columns (the 340M layer's V = 256 runs as two slices of 128): the
    same output, final state and gradients, with the last slice narrower when 16 does not divide V."""
    monkeypatch.setattr(state_passes, "VALUE_SLICE", 16)
    B, T, H, K, V, init, use_qk_l2norm, dtype = CASES[case]
    assert V > 16
    inputs = make_inputs(gen, B, T, H, K, V, rule, init, dtype=dtype)
    check_against_reference(gen, inputs, B, use_qk_l2norm=use_qk_l2norm)

@pytest.mark.parametrize("rule", RULES)
def test_varlen_with_empty_and_short_segments(gen, rule):
    lengths = [0, 5, 1, 0, 70, 3, 64, 0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    inputs = make_inputs(gen, 1, sum(lengths), 2, 16, 16, rule, N=len(lengths))
    check_against_reference(gen, inputs, len(lengths), cu_seqlens=cu, scale=0.7)


def test_strong_decay_is_finite(gen):
    """g = -50 per step: every cross-position term vanishes. The true dg is ~1e-22; ours is fp32 round-off of the
    O(1) terms of q.dq - k.dk that cancel exactly, so dg is compared with an absolute floor."""
    inputs = make_inputs(gen, 1, 70, 1, 16, 16, "gated_delta", g_value=-50.0)
    check_against_reference(gen, inputs, 1, floors={4: 1.0})


def test_empty_sequence_passes_the_state_through(gen):
    q, k, v, beta, g, h0 = make_inputs(gen, 2, 0, 2, 16, 16, "gated_delta")
    o, s = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(s, h0)
    grad_s = torch.randn(s.shape, generator=gen).to(DEVICE)
    assert torch.equal(torch.autograd.grad((s * grad_s).sum(), h0)[0], grad_s)


def test_final_state_only_on_request(gen):
    q, k, v, beta, g, _ = make_inputs(gen, 1, 5, 1, 16, 16, "gated_delta", init=False)
    o, s = chunk_gated_delta_rule(q, k, v, beta, g)
    assert o.shape == v.shape and s is None


def test_torch_compile_fullgraph_matches_eager(gen):
    inputs = make_inputs(gen, 1, 20, 1, 16, 16, "gated_delta", N=2)
    cu = torch.tensor([0, 7, 20], device=DEVICE)

    def loss(q, k, v, beta, g, h0):
        o, s = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return (o * o).sum() + s.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    actual = torch.autograd.grad(compiled(*inputs), inputs)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


SMALL = {"B": 2, "T": 6, "H": 3, "K": 8, "V": 4}
BAD = {  # name: (inputs to replace, expected message)
    "q_3d": ({"q": (2, 6, 3)}, r"q has shape \(2, 6, 3\), expected \[B, T, H, K\]"),
    "k_dim": ({"k": (2, 6, 3, 9)}, r"k has shape \(2, 6, 3, 9\), expected \[B, T, H, K\] = \(2, 6, 3, 8\)"),
    "v_time": ({"v": (2, 7, 3, 4)}, r"v has shape \(2, 7, 3, 4\), expected \[B, T, H, V\] = \(2, 6, 3, \*\)"),
    "beta_shape": ({"beta": (2, 6)}, r"beta has shape \(2, 6\), expected \[B, T, H\] = \(2, 6, 3\)"),
    "beta_none": ({"beta": None}, r"beta must be a floating-point tensor"),
    "g_shape": ({"g": (2, 6, 3, 1)}, r"g has shape \(2, 6, 3, 1\), expected \[B, T, H\] = \(2, 6, 3\)"),
    "state_n": ({"initial_state": (3, 3, 8, 4)}, r"initial_state has shape \(3, 3, 8, 4\), .* = \(2, 3, 8, 4\)"),
    "varlen_batch": ({"cu_seqlens": torch.tensor([0, 6])}, r"cu_seqlens.*B = 2, expected \[1, T, H, K\]"),
    "int_v": ({"v": torch.zeros(2, 6, 3, 4, dtype=torch.int64)}, r"v must be a floating-point tensor"),
    "k_too_large": ({"q": (2, 6, 3, 260), "k": (2, 6, 3, 260)}, r"K = 260, the chunk kernels take K <= 256"),
}


def small_inputs(B, T, H, K, V, **change):
    """Valid zero inputs (as keyword arguments), with some replaced: a shape tuple means zeros of that shape."""
    kw = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V), "beta": (B, T, H), "g": (B, T, H), **change}
    return {name: torch.zeros(x) if isinstance(x, tuple) else x for name, x in kw.items()}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise(case):
    change, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**small_inputs(**SMALL, **change))


@pytest.mark.parametrize("cu,message", [(torch.tensor([0, 2, 5]), r"from 0 to T = 6, got \[0, 2, 5\]"),
                                        (torch.tensor([0.0, 6.0]), r"integer tensor")])
def test_bad_cu_seqlens_raise(cu, message):
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**small_inputs(**{**SMALL, "B": 1}, cu_seqlens=cu))
