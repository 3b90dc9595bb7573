"""--backend compile: the torch.compile'd static step equals the eager one (a hybrid: MoM and attention layers)."""

import pytest
import torch
from helpers import random_model, rel_err, small_config

from momctl import StepState
from momctl.export.compiled import CompiledStep
from momctl.export.step import decode_step


def test_compiled_step_equals_eager_step_and_leaves_its_input_alone():
    model = random_model(small_config(num_layers=2, attention_layers=(1,)), dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    _, prefilled = model.prefill(ids[:, :4])
    eager = compiled = StepState.from_inference(prefilled, capacity=12)
    step = CompiledStep(model)
    assert step.warm_up(ids[:, 4], compiled) > 0 and step.compile_seconds is not None
    before = [t.clone() for t in compiled.tensors()]
    with torch.no_grad():
        for t in range(4, 10):
            want, eager = decode_step(model, ids[:, t], eager)
            got, new = step(ids[:, t], compiled)
            if t == 4:
                assert all(torch.equal(a, b) for a, b in zip(compiled.tensors(), before, strict=True))
            compiled = new
            assert rel_err(got, want) < 1e-5
    assert compiled.cache_length == 10 and compiled.positions.tolist() == [10, 10]
    with pytest.raises(ValueError, match="KV caches are full"):
        step(ids[:, 0], StepState.from_inference(prefilled, capacity=4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("inductor", [True, False])
def test_cuda_graphs_step_equals_eager_step_when_its_state_is_fed_back(inductor):
    """Ping-pong CUDA graphs: 20 fed-back steps with batch sizes 1 and 3 (two graphs each) match the eager step;
    a state from elsewhere (here the eager one) is taken in mid-way; the prefilled state is left alone."""
    model = random_model(small_config(num_layers=3, attention_layers=(1,)), dtype=torch.float32).cuda()
    step = CompiledStep(model, inductor=inductor)
    for batch_size, capacity in ((1, 32), (3, 32), (3, 40)):  # a new KV capacity gets its own buffers and graphs
        ids = torch.randint(0, 50, (batch_size, 24), device="cuda")
        _, prefilled = model.prefill(ids[:, :4])
        eager = compiled = StepState.from_inference(prefilled, capacity=capacity)
        before = [t.clone() for t in compiled.tensors()]
        step.warm_up(ids[:, 4], compiled)
        with torch.no_grad():
            for t in range(4, 24):
                if t == 12:
                    compiled = eager  # a state from elsewhere is copied into the graphs' buffers
                want, eager = decode_step(model, ids[:, t], eager)
                got, compiled = step(ids[:, t], compiled)
                assert rel_err(got, want) < 1e-4, (batch_size, t)
        assert all(torch.equal(a, b) for a, b in zip(StepState.from_inference(prefilled, capacity=capacity).tensors(),
                                                     before, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_advance_memories_in_place_and_refuse_an_older_state():
    """The memories are one buffer advanced in place: the state before the last call is refused (not silently
    stepped from its advanced memories), while a clone of it stays usable and gives the eager result."""
    model = random_model(small_config(num_layers=2), dtype=torch.float32).cuda()
    step = CompiledStep(model)
    ids = torch.randint(0, 50, (2, 8), device="cuda")
    _, prefilled = model.prefill(ids[:, :4])
    with torch.no_grad():
        _, first = step(ids[:, 4], StepState.from_inference(prefilled))
        kept = first.clone()
        _, second = step(ids[:, 5], first)
        assert second.layers[0].memory is first.layers[0].memory
        with pytest.raises(ValueError, match="advanced in place by a later step"):
            step(ids[:, 6], first)
        got, _ = step(ids[:, 5], kept)
        want, _ = decode_step(model, ids[:, 5], kept)
    assert rel_err(got, want) < 1e-4
