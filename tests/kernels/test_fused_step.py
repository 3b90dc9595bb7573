"""The fused MoM decode step against its reference (interpreted on the CPU): outputs, advanced and copied slots,
conv windows, routing edge cases."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from momctl.kernels.common import fused_step as fs
from momctl.kernels.common.naive_step import mom_step_ref

# rule -> (delta, decay)
RULES = {"gated_delta": (True, True), "delta": (True, False), "gated": (False, True), "linear": (False, False)}


@pytest.fixture
def poison(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element no program writes fails the comparison."""
    monkeypatch.setattr(fs, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))


def make_inputs(gen, B, E, shared, H, K, V, rule, W=4, dtype=torch.float32):
    """Random packed projections `[B, P]` (laid out as `mixer_linears` packs them), filters and states."""
    delta, decay = RULES[rule]
    S = E + shared
    widths = {"gate": E if E > 1 else 0, "q": H * K, "k": S * H * K, "v": S * H * V, "b": S * H if delta else 0,
              "a": S * H if decay else 0}
    starts, column = {}, 0
    for name, width in widths.items():
        starts[name] = column if width else -1
        column += width

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    proj = randn(B, column).to(dtype)
    filters = tuple(randn(C, 1, W) * 0.5 for C in (H * K, H * K, H * V))
    A_log, dt_bias = (randn(H), randn(H)) if decay else (None, None)
    memory = randn(B, S, H, K, V)
    conv = randn(B, S, W - 1, 2 * H * K + H * V)
    return proj, fs.StepColumns(**starts), filters, A_log, dt_bias, memory, conv


def run_both(inputs, **kw):
    proj, columns, filters, A_log, dt_bias, memory, conv = inputs
    args = (proj, columns, filters, A_log, dt_bias, memory, conv)
    ref_args = (proj.double(), columns, tuple(f.double() for f in filters), *(None if t is None else t.double()
                                                                               for t in (A_log, dt_bias)),
                memory.double(), conv.double())
    return fs.fused_mom_step(*args, **kw), mom_step_ref(*ref_args, **kw)


def touched_slots(o):
    """[B, S] slots whose output is not zero (the touched ones)."""
    return o.abs().amax(dim=(2, 3)) > 0


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("K,V", [(32, 32), (48, 40)])
def test_matches_reference(gen, poison, rule, K, V):
    inputs = make_inputs(gen, 3, 4, True, 2, K, V, rule)
    before = [t.clone() for t in (inputs[5], inputs[6])]
    (o, memory, conv), (o_ref, memory_ref, conv_ref) = run_both(inputs, num_memories=4, top_k=2,
                                                                delta=RULES[rule][0])
    assert torch.equal(inputs[5], before[0]) and torch.equal(inputs[6], before[1]), "the input state was modified"
    assert o.dtype == memory.dtype == conv.dtype == torch.float32
    assert_close(o, o_ref, 1e-5)
    assert_close(memory, memory_ref, 1e-5)
    assert_close(conv, conv_ref, 1e-6)
    touched = touched_slots(o)
    assert touched.sum(1).tolist() == [3, 3, 3], "each token reaches its top 2 memories and the shared one"
    assert torch.equal(memory[~touched], inputs[5][~touched]), "an untouched memory changed"
    assert torch.equal(conv[~touched], inputs[6][~touched]), "an untouched conv window moved"


@pytest.mark.parametrize("rule", ["gated_delta", "linear"])
def test_in_place_memories_equal_the_out_of_place_step(gen, poison, rule):
    """conv_out given: touched slots advanced in place, untouched ones left alone (a NaN in an untouched
    memory stays there, and never reaches an output); the conv windows go to the other buffer."""
    inputs = make_inputs(gen, 3, 4, True, 2, 32, 40, rule)
    kw = dict(num_memories=4, top_k=2, delta=RULES[rule][0])
    o_ref, memory_ref, conv_ref = fs.fused_mom_step(*inputs, **kw)
    untouched = ~touched_slots(o_ref)
    memory = inputs[5].clone()
    memory[untouched] = float("nan")
    new_conv = torch.full_like(inputs[6], float("nan"))
    o, memory_out, conv_out = fs.fused_mom_step(*inputs[:5], memory, inputs[6], conv_out=new_conv, **kw)
    assert memory_out is memory and conv_out is new_conv
    assert torch.equal(o, o_ref) and torch.equal(conv_out, conv_ref)
    assert torch.equal(memory[~untouched], memory_ref[~untouched])
    assert memory[untouched].isnan().all(), "an untouched memory was written"
    with pytest.raises(ValueError, match="not conv itself"):
        fs.fused_mom_step(*inputs[:5], memory, inputs[6], conv_out=inputs[6], **kw)


@pytest.mark.parametrize("logits,top_k,chosen", [([0.0, 2.0, 1.0, -1.0], 2, [1, 2]), ([1.0, 1.0, 0.0, 0.0], 1, [0]),
                                                   ([-3.0, 0.5, 0.5, 4.0], 3, [1, 2, 3])])
def test_routing_picks_the_top_k_and_weights_them(gen, logits, top_k, chosen):
    """Set router logits: the chosen memories (ties: the lower index) and the shared one are touched, and each
    output is the slot's unweighted output times softmax-over-the-chosen."""
    proj, columns, filters, A_log, dt_bias, memory, conv = make_inputs(gen, 1, 4, True, 1, 16, 16, "linear")
    proj[0, :4] = torch.tensor(logits)
    o, _, _ = fs.fused_mom_step(proj, columns, filters, A_log, dt_bias, memory, conv, num_memories=4, top_k=top_k,
                                delta=False)
    assert touched_slots(o)[0].nonzero()[:, 0].tolist() == [*chosen, 4]
    # every memory's unweighted output: route each memory alone (top-1 with a dominant logit)
    for s in chosen:
        alone = proj.clone()
        alone[0, :4] = -10.0
        alone[0, s] = 10.0
        o_alone, _, _ = fs.fused_mom_step(alone, columns, filters, A_log, dt_bias, memory, conv, num_memories=4,
                                          top_k=1, delta=False)
        weight = torch.tensor(logits)[chosen].softmax(0)[chosen.index(s)]
        assert_close(o[0, s], weight * o_alone[0, s], 1e-5)
    assert_close(o[0, 4], o_alone[0, 4], 1e-6)  # the shared memory: weight 1 whatever the routing


@pytest.mark.parametrize("E,shared,top_k", [(1, False, 1), (1, True, 1), (4, False, 4), (3, True, 1)])
def test_routing_edge_cases(gen, poison, E, shared, top_k):
    """One memory (no router), every memory chosen, top-1."""
    inputs = make_inputs(gen, 2, E, shared, 2, 32, 32, "gated_delta")
    (o, memory, conv), (o_ref, memory_ref, conv_ref) = run_both(inputs, num_memories=E, top_k=top_k, delta=True)
    assert_close(o, o_ref, 1e-5)
    assert_close(memory, memory_ref, 1e-5)
    assert_close(conv, conv_ref, 1e-6)
    assert touched_slots(o).sum(1).tolist() == [(top_k if E > 1 else 1) + shared] * 2


def test_every_slot_conv_moves_every_window(gen, poison):
    inputs = make_inputs(gen, 2, 4, True, 2, 32, 32, "gated_delta")
    (o, memory, conv), (_, memory_ref, conv_ref) = run_both(inputs, num_memories=4, top_k=2, delta=True,
                                                            conv_every_slot=True)
    assert_close(memory, memory_ref, 1e-5)
    assert_close(conv, conv_ref, 1e-6)
    assert not torch.equal(conv[~touched_slots(o)], inputs[6][~touched_slots(o)])


def test_conv_width_two_and_bf16_projections(gen, poison):
    inputs = make_inputs(gen, 2, 4, True, 2, 32, 32, "gated_delta", W=2, dtype=torch.bfloat16)
    (o, memory, conv), (o_ref, memory_ref, conv_ref) = run_both(inputs, num_memories=4, top_k=2, delta=True)
    assert_close(o, o_ref, 1e-5)
    assert_close(memory, memory_ref, 1e-5)
    assert_close(conv, conv_ref, 1e-6)


def test_step_equals_one_token_of_the_recurrence(gen):
    """Through the routing, a touched slot's memory advances as one token of `recurrent_gated_delta_rule_ref`
    from the conv outputs the reference computes."""
    from momctl.kernels.gated_delta.naive import recurrent_gated_delta_rule_ref

    proj, columns, filters, A_log, dt_bias, memory, conv = make_inputs(gen, 1, 1, False, 1, 16, 16, "gated_delta",
                                                                       W=2)
    conv = torch.zeros_like(conv)  # empty window: the conv output is SiLU(w_last * u)
    o, new_memory, _ = fs.fused_mom_step(proj, columns, filters, A_log, dt_bias, memory, conv, num_memories=1,
                                         top_k=1, delta=True)
    col = columns
    q = torch.nn.functional.silu(filters[0][:, 0, -1] * proj[0, col.q:col.q + 16])
    k = torch.nn.functional.silu(filters[1][:, 0, -1] * proj[0, col.k:col.k + 16])
    v = torch.nn.functional.silu(filters[2][:, 0, -1] * proj[0, col.v:col.v + 16])
    beta = proj[0, col.b].sigmoid()
    g = -A_log.exp() * torch.nn.functional.softplus(proj[0, col.a] + dt_bias)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(
        q.reshape(1, 1, 1, 16), k.reshape(1, 1, 1, 16), v.reshape(1, 1, 1, 16), beta.reshape(1, 1, 1),
        g.reshape(1, 1, 1), initial_state=memory[:, 0], output_final_state=True)
    assert_close(o[0, 0], o_ref[0, 0], 1e-5)
    assert_close(new_memory[:, 0], s_ref, 1e-5)


def test_compiles_fullgraph(gen):
    proj, columns, filters, A_log, dt_bias, memory, conv = make_inputs(gen, 2, 4, True, 1, 32, 32, "gated")

    def step(proj, memory, conv):
        return fs.fused_mom_step(proj, columns, filters, A_log, dt_bias, memory, conv, num_memories=4, top_k=2,
                                 delta=False)

    eager = step(proj, memory, conv)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(proj, memory, conv)
    for a, e in zip(compiled, eager, strict=True):
        assert_close(a, e, 0)


@pytest.mark.parametrize("change,match", [
    (lambda x: {**x, "memory": x["memory"].double()}, "fp32"),
    (lambda x: {**x, "proj": x["proj"][:1]}, r"\[B, P\]"),
    (lambda x: {**x, "A_log": None}, "decay needs"),
    (lambda x: {**x, "top_k": 5}, "do not fit"),
])
def test_bad_inputs(gen, change, match):
    proj, columns, filters, A_log, dt_bias, memory, conv = make_inputs(gen, 2, 4, True, 1, 32, 32, "gated_delta")
    args = change(dict(proj=proj, columns=columns, conv_weights=filters, A_log=A_log, dt_bias=dt_bias, memory=memory,
                       conv=conv, top_k=2))
    with pytest.raises(ValueError, match=match):
        fs.fused_mom_step(**args, num_memories=4, delta=True)
