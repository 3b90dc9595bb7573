"""The Triton chunk kernels of every update rule against the fp64 loop references: output, final state and every
gradient, under TRITON_INTERPRET=1 on the CPU (compiled kernels when CUDA is there). The gated delta rule and the
delta rule (g=None) share one kernel family, gated and plain linear attention (g=None) the other."""

import kernel_checks as checks
import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE

from momctl.kernels.common import state_passes
from momctl.kernels.gated import chunk_gated_rule
from momctl.kernels.gated.naive import recurrent_gated_rule_ref
from momctl.kernels.gated_delta import chunk_gated_delta_rule
from momctl.kernels.gated_delta.naive import recurrent_gated_delta_rule_ref

pytestmark = pytest.mark.usefixtures("poison_chunk_buffers")
F64 = torch.float64
RTOL = 1e-4 if DEVICE == "cpu" else 5e-3
RULES = {"gated_delta": (True, True), "delta": (True, False), "gated": (False, True), "linear": (False, False)}
FAMILIES = ["gated_delta", "gated"]  # one rule per kernel family, for the tests that do not depend on the decay
CASES = {  # name: (B, T, H, K, V, init, use_qk_l2norm, dtype)
    "T1": (2, 1, 2, 16, 32, True, True, torch.float32),
    "T17": (1, 17, 1, 32, 16, False, True, torch.float32),
    "T64_no_l2norm": (2, 64, 2, 16, 16, True, False, torch.float32),
    "T65_f64_inputs": (1, 65, 1, 32, 32, True, True, F64),
    "T130": (1, 130, 2, 16, 16, False, True, torch.float32),
    "T40_K24_V20": (1, 40, 1, 24, 20, True, True, torch.float32),  # dims that are not powers of two
}


def kernel_and_reference(rule):
    """(kernel, loop reference) of rule, both called as f(q, k, v, beta, g, **kw); the gated family drops beta."""
    if RULES[rule][0]:
        return chunk_gated_delta_rule, recurrent_gated_delta_rule_ref
    return (lambda q, k, v, beta, g, **kw: chunk_gated_rule(q, k, v, g, **kw),
            lambda q, k, v, beta, g, **kw: recurrent_gated_rule_ref(q, k, v, g, **kw))


def make_inputs(gen, B, T, H, K, V, rule, init=True, N=None, dtype=torch.float32, g_value=None):
    """Leaves q, k, v, beta (None without the delta rule), g (None without a decay), initial_state (None unless
    init), requiring grad."""
    delta, decay = RULES[rule]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64).to(dtype) if delta else None
    g = F.logsigmoid(randn(B, T, H)) if decay else None
    if g is not None and g_value is not None:
        g = torch.full_like(g, g_value)
    h0 = randn(B if N is None else N, H, K, V) if init else None
    return [None if x is None else x.to(DEVICE).requires_grad_() for x in (q, k, v, beta, g, h0)]


def check_against_reference(gen, rule, inputs, N, floors=None, **kw):
    checks.check_against_reference(gen, *kernel_and_reference(rule), inputs, N, RTOL, floors, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_matches_reference(gen, rule, case):
    B, T, H, K, V, init, use_qk_l2norm, dtype = CASES[case]
    inputs = make_inputs(gen, B, T, H, K, V, rule, init, dtype=dtype)
    check_against_reference(gen, rule, inputs, B, use_qk_l2norm=use_qk_l2norm)


@pytest.mark.parametrize("case", ["T1", "T40_K24_V20", "T65_f64_inputs"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_state_passes_over_value_slices(gen, monkeypatch, rule, case):
    """The state passes over slices of 16 value columns (the 340M layer's V = 256 runs as two slices of 128): the
    same output, final state and gradients, with the last slice narrower when 16 does not divide V."""
    monkeypatch.setattr(state_passes, "VALUE_SLICE", 16)
    B, T, H, K, V, init, use_qk_l2norm, dtype = CASES[case]
    assert V > 16
    inputs = make_inputs(gen, B, T, H, K, V, rule, init, dtype=dtype)
    check_against_reference(gen, rule, inputs, B, use_qk_l2norm=use_qk_l2norm)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_varlen_with_empty_and_short_segments(gen, rule):
    lengths = [0, 5, 1, 0, 70, 3, 64, 0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    inputs = make_inputs(gen, 1, sum(lengths), 2, 16, 16, rule, N=len(lengths))
    check_against_reference(gen, rule, inputs, len(lengths), cu_seqlens=cu, scale=0.7)


@pytest.mark.parametrize("rule", FAMILIES)
def test_strong_decay_is_finite(gen, rule):
    """g = -50 per step: every cross-position term vanishes. The true dg is ~1e-22; ours is fp32 round-off of the
    O(1) terms of q.dq - k.dk that cancel exactly, so dg (input 4) is compared with an absolute floor."""
    inputs = make_inputs(gen, 1, 70, 1, 16, 16, rule, g_value=-50.0)
    check_against_reference(gen, rule, inputs, 1, floors={4: 1.0})


@pytest.mark.parametrize("rule", FAMILIES)
def test_empty_sequence_passes_the_state_through(gen, rule):
    q, k, v, beta, g, h0 = make_inputs(gen, 2, 0, 2, 16, 16, rule)
    o, s = kernel_and_reference(rule)[0](q, k, v, beta, g, initial_state=h0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(s, h0)
    grad_s = torch.randn(s.shape, generator=gen).to(DEVICE)
    assert torch.equal(torch.autograd.grad((s * grad_s).sum(), h0)[0], grad_s)


@pytest.mark.parametrize("rule", FAMILIES)
def test_final_state_only_on_request(gen, rule):
    q, k, v, beta, g, _ = make_inputs(gen, 1, 5, 1, 16, 16, rule, init=False)
    o, s = kernel_and_reference(rule)[0](q, k, v, beta, g)
    assert o.shape == v.shape and s is None


@pytest.mark.parametrize("rule", FAMILIES)
def test_torch_compile_fullgraph_matches_eager(gen, rule):
    kernel = kernel_and_reference(rule)[0]
    inputs = [x for x in make_inputs(gen, 1, 20, 1, 16, 16, rule, N=2) if x is not None]
    cu = torch.tensor([0, 7, 20], device=DEVICE)

    def loss(*leaves):
        q, k, v, *gates, h0 = leaves
        beta, g = gates if RULES[rule][0] else (None, *gates)
        o, s = kernel(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return (o * o).sum() + s.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    actual = torch.autograd.grad(compiled(*inputs), inputs)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


SMALL = {"B": 2, "T": 6, "H": 3, "K": 8, "V": 4}
BAD = {  # name: (inputs to replace, expected message, only for the delta family)
    "q_3d": ({"q": (2, 6, 3)}, r"q has shape \(2, 6, 3\), expected \[B, T, H, K\]", False),
    "k_dim": ({"k": (2, 6, 3, 9)}, r"k has shape \(2, 6, 3, 9\), expected \[B, T, H, K\] = \(2, 6, 3, 8\)", False),
    "v_time": ({"v": (2, 7, 3, 4)}, r"v has shape \(2, 7, 3, 4\), expected \[B, T, H, V\] = \(2, 6, 3, \*\)", False),
    "beta_shape": ({"beta": (2, 6)}, r"beta has shape \(2, 6\), expected \[B, T, H\] = \(2, 6, 3\)", True),
    "beta_none": ({"beta": None}, r"beta must be a floating-point tensor", True),
    "g_shape": ({"g": (2, 6, 3, 1)}, r"g has shape \(2, 6, 3, 1\), expected \[B, T, H\] = \(2, 6, 3\)", False),
    "state_n": ({"initial_state": (3, 3, 8, 4)}, r"initial_state has shape \(3, 3, 8, 4\), .* = \(2, 3, 8, 4\)",
                False),
    "varlen_batch": ({"cu_seqlens": torch.tensor([0, 6])}, r"cu_seqlens.*B = 2, expected \[1, T, H, K\]", False),
    "int_v": ({"v": torch.zeros(2, 6, 3, 4, dtype=torch.int64)}, r"v must be a floating-point tensor", False),
    "k_too_large": ({"q": (2, 6, 3, 260), "k": (2, 6, 3, 260)}, r"K = 260, the chunk kernels take K <= 256", False),
}


def call_with_small_inputs(rule, B, T, H, K, V, **change):
    """The family's kernel on valid zero inputs (keyword arguments), some replaced: a shape tuple means zeros of
    that shape."""
    delta = RULES[rule][0]
    kw = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V), "g": (B, T, H)}
    if delta:
        kw["beta"] = (B, T, H)
    kw = {name: torch.zeros(x) if isinstance(x, tuple) else x for name, x in {**kw, **change}.items()}
    return (chunk_gated_delta_rule if delta else chunk_gated_rule)(**kw)


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("rule", FAMILIES)
def test_bad_inputs_raise(rule, case):
    change, message, delta_only = BAD[case]
    if delta_only and not RULES[rule][0]:
        pytest.skip("the gated family takes no beta")
    with pytest.raises(ValueError, match=message):
        call_with_small_inputs(rule, **SMALL, **change)


@pytest.mark.parametrize("cu,message", [(torch.tensor([0, 2, 5]), r"from 0 to T = 6, got \[0, 2, 5\]"),
                                        (torch.tensor([0.0, 6.0]), r"integer tensor")])
@pytest.mark.parametrize("rule", FAMILIES)
def test_bad_cu_seqlens_raise(rule, cu, message):
    with pytest.raises(ValueError, match=message):
        call_with_small_inputs(rule, **{**SMALL, "B": 1}, cu_seqlens=cu)
