"""GPU checks of the fused decode step at the paper's shapes (run on the GPU machine: `pytest -m gpu`)."""

import pytest
import torch
from kernel_checks import assert_close
from test_fused_step import RULES, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("B", [1, 16])
def test_matches_reference_at_paper_shapes(rule, B):
    from momctl.kernels.common.fused_step import fused_recurrent_step
    from momctl.kernels.common.naive_step import recurrent_step_ref

    gen = torch.Generator().manual_seed(B)
    q, k, v, beta, g, state, slots = make_inputs(gen, B, 3, 5, 4, 256, 256, rule, torch.bfloat16)
    o, new = fused_recurrent_step(q, k, v, beta, g, state, slots, delta=RULES[rule][0])
    o_ref, new_ref = recurrent_step_ref(q, k, v, beta, g, state.double(), slots, delta=RULES[rule][0])
    assert_close(o, o_ref, 5e-3)  # o is rounded to bf16
    assert_close(new, new_ref, 1e-5)


def test_captured_in_a_cuda_graph_with_ping_pong_buffers():
    """Replays of one captured step, state fed back through two buffers, equal the eager steps."""
    from momctl.kernels.common.fused_step import fused_recurrent_step

    gen = torch.Generator().manual_seed(0)
    q, k, v, beta, g, state, slots = make_inputs(gen, 4, 3, 5, 4, 256, 256, "gated_delta", torch.bfloat16)
    expected, s = [], state
    for _ in range(3):
        o, s = fused_recurrent_step(q, k, v, beta, g, s, slots, delta=True)
        expected.append(o)
    buffers = [state.clone(), torch.empty_like(state)]
    graph = torch.cuda.CUDAGraph()
    static_in = buffers[0].clone()
    fused_recurrent_step(q, k, v, beta, g, static_in, slots, delta=True)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        o_static, s_static = fused_recurrent_step(q, k, v, beta, g, static_in, slots, delta=True)
    static_in.copy_(buffers[0])
    for step in range(3):
        graph.replay()
        assert_close(o_static, expected[step], 0)
        static_in.copy_(s_static)
