"""The static step (export/step.py) is the model: step == forward at every position, for every family and for
prefill in pieces, multi-turn and padded batches; it never writes its input state, and it makes no host sync."""

import pytest
import torch
from helpers import random_model, rel_err, small_config
from torch.utils._python_dispatch import TorchDispatchMode

from momctl import StepState
from momctl.export.step import decode_step

FAMILIES = {
    "gated_delta+shared": dict(),
    "gated_delta": dict(shared_memory=False),
    "delta+shared": dict(update_rule="delta"),
    "delta": dict(update_rule="delta", shared_memory=False),
    "gated+shared": dict(update_rule="gated"),
    "gated": dict(update_rule="gated", shared_memory=False),
    "linear+shared": dict(update_rule="linear"),
    "linear": dict(update_rule="linear", shared_memory=False, top_k=1),
    "time-conv+shared": dict(conv_scope="time"),
    "time-conv-delta": dict(conv_scope="time", update_rule="delta", shared_memory=False),
    "time-conv-gated+shared": dict(conv_scope="time", update_rule="gated"),
    "time-conv-linear": dict(conv_scope="time", update_rule="linear", shared_memory=False),
    "gdn": dict(num_memories=1, top_k=1, shared_memory=False),
    "hybrid": dict(num_layers=3, attention_layers=(1,)),
    "hybrid-gqa": dict(num_layers=3, attention_layers=(0,), attn_num_kv_heads=2),
}
# Host synchronisations: a device value read on the host, or an output whose size depends on values.
SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item")


def step_all(model, ids_BT, state):
    """decode_step over every column of ids; returns logits `[B, T, W]` and the last state."""
    logits = []
    for t in range(ids_BT.shape[1]):
        step_logits, state = decode_step(model, ids_BT[:, t], state)
        logits.append(step_logits)
    return torch.stack(logits, 1), state


@pytest.mark.parametrize("family", FAMILIES)
def test_step_equals_forward_at_every_position(family):
    model = random_model(small_config(**FAMILIES[family]))
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        for t in (1, 7):
            _, state = model.prefill(ids[:, :t])
            logits, _ = step_all(model, ids[:, t:], StepState.from_inference(state))
            assert rel_err(logits, full[:, t:]) < 1e-10, t


@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv+shared", "gdn", "hybrid"])
def test_left_padded_batch_of_different_lengths(family):
    """As momctl generate runs it: left-padded prompts prefilled with a mask, then steps; each row == alone."""
    model = random_model(small_config(**FAMILIES[family]))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=gen) for n in (9, 2, 14)]
    continuation = torch.randint(0, 50, (3, 5), generator=gen)
    T = 14
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.no_grad():
        _, state = model.prefill(ids, attention_mask=mask)
        logits, state = step_all(model, continuation, StepState.from_inference(state))
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[i]])[None]).logits[0]
            assert rel_err(logits[i], alone[len(p):]) < 1e-10, i
    assert state.positions.tolist() == [14, 7, 19]


@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv+shared", "hybrid"])
def test_prefill_in_pieces_steps_and_more_turns_equal_one_forward(family):
    """Turn 1 prefilled in pieces, steps, turn 2 prefilled from the step state, steps: == one forward."""
    model = random_model(small_config(**FAMILIES[family]))
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        pieces, state = [], None
        for lo, hi in ((0, 3), (3, 4), (4, 13)):
            logits, state = model.prefill(ids[:, lo:hi], state)
            pieces.append(logits)
        for t in range(13, 20):
            logits, state = model.step(ids[:, t], state)
            pieces.append(logits[:, None])
        logits, state = model.prefill(ids[:, 20:31], state)  # a second turn continues the step state
        pieces.append(logits)
        for t in range(31, 40):
            logits, state = model.step(ids[:, t], state)
            pieces.append(logits[:, None])
    assert rel_err(torch.cat(pieces, 1), full) < 1e-10
    assert state.positions.tolist() == [40, 40]


@pytest.mark.parametrize("family", ["gated_delta+shared", "delta", "gated+shared", "linear", "time-conv+shared",
                                    "gdn"])
def test_fused_step_kernel_equals_the_reference_step(monkeypatch, family):
    """The fused Triton step (CUDA path; here interpreted) against the gather-step-scatter reference: logits and
    every state tensor over a few steps."""
    model = random_model(small_config(**FAMILIES[family]), dtype=torch.float32)
    ids_BT = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    _, prefilled = model.prefill(ids_BT[:, :7])
    results = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("MOMCTL_KERNELS", choice)
        results[choice] = step_all(model, ids_BT[:, 7:], StepState.from_inference(prefilled))
    (ref_logits, ref_state), (logits, state) = results["reference"], results["triton"]
    assert rel_err(logits, ref_logits) < 1e-5
    for layer, ref_layer in zip(state.layers, ref_state.layers, strict=True):
        assert rel_err(layer.memory, ref_layer.memory) < 1e-5
        assert rel_err(layer.conv, ref_layer.conv) < 1e-5


def test_kv_cache_grows_when_full():
    model = random_model(small_config(**FAMILIES["hybrid"]))
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        _, prefilled = model.prefill(ids[:, :4])
        state = StepState.from_inference(prefilled, capacity=5)
        assert state.capacity == 5
        for t in range(4, 12):
            logits, state = model.step(ids[:, t], state)
            assert rel_err(logits, full[:, t]) < 1e-10
    assert state.capacity > 12 and state.cache_length == 12


@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv+shared", "hybrid"])
def test_step_never_writes_its_input_state(family):
    model = random_model(small_config(**FAMILIES[family]))
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(6))
    _, state = model.prefill(ids[:, :8])
    state = StepState.from_inference(state)
    before = [t.clone() for t in state.tensors()]
    with torch.no_grad():
        _, after = decode_step(model, ids[:, 8], state)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors(), before, strict=True))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(after.tensors(), state.tensors(), strict=True))


@pytest.mark.parametrize("scope", ["segment", "time"])
def test_unrouted_memories_are_untouched(scope):
    """Only the routed (and shared) slots' memories change; conv windows too, unless each slot's conv sees time."""
    model = random_model(small_config(num_memories=4, top_k=1, conv_scope=scope))
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(7))
    _, state = model.prefill(ids[:, :10])
    state = StepState.from_inference(state)
    with torch.no_grad():
        _, after = decode_step(model, ids[:, 10], state)
    for b in range(3):
        memory_changed = [not torch.equal(state.layers[0].memory[b, s], after.layers[0].memory[b, s])
                          for s in range(5)]
        conv_changed = [not torch.equal(state.layers[0].conv[b, s], after.layers[0].conv[b, s]) for s in range(5)]
        assert sum(memory_changed[:4]) == 1 and memory_changed[4]
        assert conv_changed == (memory_changed if scope == "segment" else [True] * 5)


def test_to_inference_and_back_is_the_same_state():
    model = random_model(small_config(**FAMILIES["hybrid"]))
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    _, prefilled = model.prefill(ids, attention_mask=mask)
    state = StepState.from_inference(prefilled, capacity=9)
    again = StepState.from_inference(state.to_inference(), capacity=9)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors(), again.tensors(), strict=True))


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv+shared", "gdn", "hybrid"])
def test_step_runs_no_op_that_syncs_the_host(family):
    model = random_model(small_config(**FAMILIES[family]))
    _, state = model.prefill(torch.randint(0, 50, (2, 5)))
    state = StepState.from_inference(state)
    with torch.no_grad(), OpRecorder() as recorder:
        decode_step(model, torch.randint(0, 50, (2,)), state)
    assert "mm" in recorder.ops, "the recorder saw no matmul"
    assert not [op for op in recorder.ops if any(s in op for s in SYNC_OPS)], sorted(recorder.ops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gated_delta+shared", "time-conv+shared", "hybrid"])
def test_decode_step_makes_no_host_synchronisation_on_cuda(family):
    model = random_model(small_config(**FAMILIES[family]), dtype=torch.float32).cuda()
    _, state = model.prefill(torch.randint(0, 50, (4, 20), device="cuda"))
    state = StepState.from_inference(state)
    token = torch.randint(0, 50, (4,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits, state = decode_step(model, token, state)
            token = logits.argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
