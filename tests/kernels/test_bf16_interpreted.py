"""The chunk rules with bf16 inputs on the CPU, in Triton's interpreter made to round as the GPU does
(`bf16_interpreter.py`): the bf16 code paths (the WY kernels' split bf16 dots, bf16 states in the dots) against the
fp32 reference, with the GPU test's bound (`test_chunk_gpu.py`: relative RMS error 5e-3 for every tensor)."""

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
         "gated": (chunk_gated_rule, chunk_gated_rule_ref)}


# Open: with an initial state at K = 256 the gated delta rule's dg errs 1.2e-2. The cause is the term e^{G_L} <h, dh'>
# of each chunk, summed from the bf16 copies of h and dh' (K x V products, large when a segment starts from a large
# state): with fp32 h and dh buffers the same case errs 3.4e-3 (tried, not kept: twice their memory at the training
# peak). Without the state it errs 3.7e-3. Held to 1.5e-2 until fixed, every other tensor of the case to 5e-3.
LOOSER = {("gated_delta", 256): {"dg": 1.5e-2}}


@pytest.mark.parametrize("K", [64, 256])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_bf16_matches_fp32_reference(monkeypatch, rule, K):
    faithful_bf16(monkeypatch)
    kernel, reference = RULES[rule]
    cu, inputs = varlen_rule_inputs(rule == "gated_delta", [200, 1, 0, 64, 130, 65], 1, K, torch.bfloat16,
                                    torch.Generator().manual_seed(0))
    actual = rule_outputs_and_grads(kernel, inputs, cu)
    exact = [None if x is None else x.detach().float().requires_grad_() for x in inputs]
    assert_all_close(actual, rule_outputs_and_grads(reference, exact, cu), inputs, 5e-3, LOOSER.get((rule, K)))
