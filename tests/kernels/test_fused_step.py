"""The fused decode step against its reference (interpreted on the CPU): outputs, advanced and copied slots."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close
from momctl.kernels.common import fused_step as fs
from momctl.kernels.common.naive_step import recurrent_step_ref

RULES = {"gated_delta": (True, True), "delta": (True, False), "gated": (False, True), "linear": (False, False)}


@pytest.fixture
def poison(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element no program writes fails the comparison."""
    monkeypatch.setattr(fs, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))


def make_inputs(gen, B, A, S, H, K, V, rule, dtype=torch.float32):
    delta, gated = RULES[rule]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    slots = torch.stack([torch.randperm(S, generator=gen)[:A] for _ in range(B)]).to(DEVICE)
    q, k, v = randn(B, A, H, K).to(dtype), randn(B, A, H, K).to(dtype), randn(B, A, H, V).to(dtype)
    beta = torch.rand(B, A, H, generator=gen).to(DEVICE) if delta else None
    g = -torch.rand(B, A, H, generator=gen).to(DEVICE) if gated else None
    return q, k, v, beta, g, randn(B, S, H, K, V), slots


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("K,V", [(32, 32), (48, 40)])
def test_matches_reference(gen, poison, rule, K, V):
    q, k, v, beta, g, state, slots = make_inputs(gen, 3, 3, 5, 2, K, V, rule)
    before = state.clone()
    o, new = fs.fused_recurrent_step(q, k, v, beta, g, state, slots, delta=RULES[rule][0])
    o_ref, new_ref = recurrent_step_ref(q.double(), k.double(), v.double(), beta, g, state.double(), slots,
                                        delta=RULES[rule][0])
    assert torch.equal(state, before), "the input state was modified"
    assert o.dtype == torch.float32 and new.dtype == torch.float32
    assert_close(o, o_ref, 1e-5)
    assert_close(new, new_ref, 1e-5)
    untouched = torch.ones(3, 5, dtype=torch.bool, device=DEVICE).scatter(1, slots, False)
    assert torch.equal(new[untouched], state[untouched]), "an untouched slot changed"


def test_step_equals_one_token_of_the_recurrence(gen, poison):
    """Through the slot map, a step is one token of `recurrent_gated_delta_rule_ref` on that slot's state."""
    from momctl.kernels.gated_delta.naive import recurrent_gated_delta_rule_ref

    q, k, v, beta, g, state, slots = make_inputs(gen, 2, 2, 4, 2, 32, 32, "gated_delta")
    o, new = fs.fused_recurrent_step(q, k, v, beta, g, state, slots, delta=True)
    for b in range(2):
        for a in range(2):
            s = slots[b, a]
            o_ref, s_ref = recurrent_gated_delta_rule_ref(
                q[b, a][None, None], k[b, a][None, None], v[b, a][None, None], beta[b, a][None, None],
                g[b, a][None, None], initial_state=state[b, s][None], output_final_state=True)
            assert_close(o[b, a], o_ref[0, 0], 1e-5)
            assert_close(new[b, s], s_ref[0], 1e-5)


def test_bf16_inputs_and_no_normalisation(gen, poison):
    q, k, v, beta, g, state, slots = make_inputs(gen, 2, 3, 5, 1, 32, 32, "gated_delta", torch.bfloat16)
    o, new = fs.fused_recurrent_step(q, k, v, beta, g, state, slots, delta=True, use_qk_l2norm=False, scale=0.5)
    o_ref, new_ref = recurrent_step_ref(q, k, v, beta, g, state, slots, delta=True, use_qk_l2norm=False, scale=0.5)
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref, 1e-2)
    assert_close(new, new_ref, 1e-5)


def test_compiles_fullgraph(gen):
    q, k, v, beta, g, state, slots = make_inputs(gen, 2, 2, 3, 1, 32, 32, "gated")

    def step(q, k, v, g, state):
        return fs.fused_recurrent_step(q, k, v, None, g, state, slots, delta=False)

    eager = step(q, k, v, g, state)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, g, state)
    for a, e in zip(compiled, eager, strict=True):
        assert_close(a, e, 0)


@pytest.mark.parametrize("change,match", [
    (lambda x: {**x, "slots": x["slots"][:, :1]}, "slots"),
    (lambda x: {**x, "state": x["state"].double()}, "fp32 state"),
    (lambda x: {**x, "beta": None}, "needs beta"),
])
def test_bad_inputs(gen, change, match):
    q, k, v, beta, g, state, slots = make_inputs(gen, 2, 2, 3, 1, 32, 32, "gated_delta")
    args = change(dict(q=q, k=k, v=v, beta=beta, g=g, state=state, slots=slots))
    with pytest.raises(ValueError, match=match):
        fs.fused_recurrent_step(**args, delta=True)
