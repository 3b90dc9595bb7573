"""Decode is an equivalence: prefill(x[:t]) then step() token by token == forward(x) at every position."""

import pytest
import torch
from helpers import random_model, rel_err, small_config

FAMILIES = {
    "gated_delta+shared": dict(),
    "delta": dict(update_rule="delta", shared_memory=False),
    "gated+shared": dict(update_rule="gated"),
    "linear": dict(update_rule="linear", shared_memory=False, top_k=1),
    "time-conv": dict(conv_scope="time"),
    "gdn": dict(num_memories=1, top_k=1, shared_memory=False),
    "hybrid": dict(num_layers=3, attention_layers=(1,)),
    "transformer": dict(attention_layers=(0, 1)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_step_equals_forward_at_every_position(family):
    model = random_model(small_config(**FAMILIES[family]))
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
    for t in (1, 5, 23):
        logits, state = model.prefill(ids[:, :t])
        assert rel_err(logits, full[:, :t]) < 1e-10
        last, last_state = model.prefill(ids[:, :t], last_logits_only=True)  # what generation's prefill asks for
        assert last.shape == (2, 1, full.shape[-1]) and rel_err(last, full[:, t - 1:t]) < 1e-10
        assert torch.equal(last_state.positions, state.positions)
        for s in range(t, 24):
            step_logits, state = model.step(ids[:, s], state)
            assert rel_err(step_logits, full[:, s]) < 1e-10, (t, s)


@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv", "hybrid"])
def test_prefill_in_random_pieces_equals_one_prefill(family):
    model = random_model(small_config(**FAMILIES[family]))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (2, 150), generator=gen)
    whole, whole_state = model.prefill(ids)
    pieces, state, start = [], None, 0
    while start < ids.shape[1]:
        n = int(torch.randint(1, 71, (1,), generator=gen))
        logits, state = model.prefill(ids[:, start:start + n], state)
        pieces.append(logits)
        start += n
    assert rel_err(torch.cat(pieces, dim=1), whole) < 1e-10
    for got, want in zip(state.layers, whole_state.layers, strict=True):
        for name in vars(want):
            assert rel_err(getattr(got, name).double(), getattr(want, name).double()) < 1e-10
    assert torch.equal(state.positions, whole_state.positions)


@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv", "hybrid", "transformer"])
def test_batch_of_different_prompt_lengths_with_left_padding_is_exact(family):
    model = random_model(small_config(**FAMILIES[family]))
    torch.manual_seed(3)
    lengths = [9, 3, 14]
    prompts = [torch.randint(0, 50, (n,)) for n in lengths]
    continuation = torch.randint(0, 50, (3, 6))
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    logits, state = model.prefill(ids, attention_mask=mask)
    steps = []
    for s in range(6):
        step_logits, state = model.step(continuation[:, s], state)
        steps.append(step_logits)
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[i]])[None]).logits[0]
        assert rel_err(logits[i, T - len(p):], alone[:len(p)]) < 1e-10
        assert rel_err(torch.stack([s[i] for s in steps]), alone[len(p):]) < 1e-10
    assert state.positions.tolist() == [n + 6 for n in lengths]


def test_state_size_does_not_grow_for_mom():
    model = random_model(small_config())
    _, state = model.prefill(torch.randint(0, 50, (1, 10)))
    size = state.nbytes
    for _ in range(20):
        _, state = model.step(torch.randint(0, 50, (1,)), state)
    assert state.nbytes == size


def test_step_leaves_unrouted_memories_bitwise_untouched():
    model = random_model(small_config(num_memories=4, top_k=1, shared_memory=False))
    _, state = model.prefill(torch.randint(0, 50, (1, 12)))
    before = state.layers[0].memory.clone(), state.layers[0].conv.clone()
    _, after = model.step(torch.randint(0, 50, (1,)), state)
    changed = [not torch.equal(before[0][0, e], after.layers[0].memory[0, e]) for e in range(4)]
    conv_changed = [not torch.equal(before[1][0, e], after.layers[0].conv[0, e]) for e in range(4)]
    assert sum(changed) == 1 and conv_changed == changed


def test_packed_projections_are_zero_padded_to_aligned_rows_and_keep_the_linears_as_views():
    from momctl.export.step_weights import ROW_MULTIPLE, mixer_linears, pack_for_decoding
    from momctl.mixer import MoMMixer

    model = random_model(small_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pack_for_decoding(model)
    mixers = [m for m in model.modules() if isinstance(m, MoMMixer)]
    for mixer in mixers:
        linears, _ = mixer_linears(mixer)
        rows = sum(linear.out_features for linear in linears)
        weight = mixer._decode_pack.weight
        assert rows % ROW_MULTIPLE and weight.shape[0] == rows + (-rows % ROW_MULTIPLE)
        assert torch.equal(weight[rows:], torch.zeros_like(weight[rows:]))
        assert linears[-1].weight.data_ptr() == weight[rows - linears[-1].out_features].data_ptr()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
