"""The chunk rules with bf16 inputs on the CPU, in Triton's interpreter made to round as the GPU does
(`bf16_interpreter.py`): the bf16 code paths (the WY kernels' split bf16 dots, bf16 states in the dots) against the
fp32 reference, with the GPU test's bound (`test_chunk_gpu.py`: relative RMS error 5e-3 for every tensor). Segments
start from large initial states and include one-token ones: there the decay's gradient once erred 1.2e-2 at K = 256
(`<h, dh'>` summed from the bf16 dh'; now from the fp32 one, see `chunk_state_bwd`). The delta rule, whose state
never decays, erred 5.4e-3 in dk while the kernels worked on bf16 copies of the normalised q and k (now they scale
by the norms, `l2norm.py`)."""

import pytest
import torch
from bf16_interpreter import faithful_bf16
from kernel_checks import DEVICE, assert_all_close, rule_outputs_and_grads, varlen_rule_inputs

from momctl.kernels.gated import chunk_gated_rule
from momctl.kernels.gated.naive import chunk_gated_rule_ref
from momctl.kernels.gated_delta import chunk_gated_delta_rule
from momctl.kernels.gated_delta.naive import chunk_gated_delta_rule_ref

pytestmark = pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU, test_chunk_gpu.py runs bf16 compiled")
RULES = {"gated_delta": (chunk_gated_delta_rule, chunk_gated_delta_rule_ref),
         "delta": (chunk_gated_delta_rule, chunk_gated_delta_rule_ref),  # g = None
         "gated": (chunk_gated_rule, chunk_gated_rule_ref)}


@pytest.mark.parametrize("K", [64, 256])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_bf16_matches_fp32_reference(monkeypatch, rule, K):
    faithful_bf16(monkeypatch)
    kernel, reference = RULES[rule]
    cu, inputs = varlen_rule_inputs(rule != "gated", [200, 1, 0, 64, 130, 65], 1, K, torch.bfloat16,
                                    torch.Generator().manual_seed(0))
    if rule == "delta":
        inputs[4] = None
    actual = rule_outputs_and_grads(kernel, inputs, cu)
    exact = [None if x is None else x.detach().float().requires_grad_() for x in inputs]
    assert_all_close(actual, rule_outputs_and_grads(reference, exact, cu), inputs, 5e-3)
