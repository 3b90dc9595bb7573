"""GPU checks of the fused MoM decode step at the paper's shapes (run on the GPU machine: `pytest -m gpu`)."""

import pytest
import torch
from kernel_checks import assert_close
from test_fused_step import RULES, make_inputs, run_both

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("B", [1, 16])
def test_matches_reference_at_paper_shapes(rule, B):
    gen = torch.Generator().manual_seed(B)
    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t
              for t in make_inputs(gen, B, 4, True, 4, 256, 256, rule, dtype=torch.bfloat16)]
    inputs[2] = tuple(f.cuda() for f in inputs[2])
    (o, memory, conv), (o_ref, memory_ref, conv_ref) = run_both(inputs, num_memories=4, top_k=2,
                                                                delta=RULES[rule][0])
    assert_close(o, o_ref, 1e-4)
    assert_close(memory, memory_ref, 1e-5)
    assert_close(conv, conv_ref, 1e-6)


def test_captured_in_a_cuda_graph_with_ping_pong_buffers():
    """Replays of one captured step, state fed back through two buffers, equal the eager steps."""
    from momctl.kernels.common.fused_step import fused_mom_step

    gen = torch.Generator().manual_seed(0)
    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t
              for t in make_inputs(gen, 4, 4, True, 4, 256, 256, "gated_delta", dtype=torch.bfloat16)]
    proj, columns, filters, A_log, dt_bias, memory, conv = inputs
    filters = tuple(f.cuda() for f in filters)

    def step(memory, conv):
        return fused_mom_step(proj, columns, filters, A_log, dt_bias, memory, conv, num_memories=4, top_k=2,
                              delta=True)

    expected, m, c = [], memory, conv
    for _ in range(3):
        o, m, c = step(m, c)
        expected.append((o, m))
    static_m, static_c = memory.clone(), conv.clone()
    step(static_m, static_c)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_out, m_out, c_out = step(static_m, static_c)
    for o_expected, m_expected in expected:
        graph.replay()
        assert_close(o_out, o_expected, 0)
        assert_close(m_out, m_expected, 0)
        static_m.copy_(m_out)
        static_c.copy_(c_out)
