"""Every autotune config of every chunk-rule kernel, pinned one at a time, against the reference.

Autotuning picks a config by speed, on whichever GPU runs it, so a config that computes something wrong (a compiler
bug that hits one tiling or warp count, as Triton 3.4-3.7 on Hopper is known to have) would pass every other test on
the machine whose autotuner happened to pick another. Here one kernel runs each of its configs in turn while every
other kernel runs its first config, so a failure names the config. On the CPU (interpreter) this checks the kernels'
indexing for each config's block sizes; on the GPU (`pytest -m gpu`) it runs the compiled configs at real head sizes.
There every case compiles its config: run it in parts, e.g. `pytest -m gpu tests/kernels/test_every_config.py -k
"wy_bwd and 256"`.

A config passes when each output and gradient errs at most RTOL, or at most 1.25x what the default configs (every
kernel on its first) err on the same inputs: a wrong tiling errs by O(1), while bf16 rounding alone takes the gated
delta rule's dg just over 5e-3 on these inputs under every config (measured on an H100). The 5e-3 bound of the
default configs at real shapes is test_chunk_gpu's.
"""

import pytest
import torch
from kernel_checks import DEVICE, rule_errors, rule_outputs_and_grads, varlen_rule_inputs

from momctl.kernels.common import chunk_output, chunk_state, l2norm
from momctl.kernels.gated import chunk_gated_rule
from momctl.kernels.gated.naive import chunk_gated_rule_ref
from momctl.kernels.gated_delta import chunk_gated_delta_rule, wy
from momctl.kernels.gated_delta.naive import chunk_gated_delta_rule_ref

GPU = DEVICE == "cuda"
pytestmark = [pytest.mark.usefixtures("poison_chunk_buffers")] + ([pytest.mark.gpu] if GPU else [])
TUNERS = {name: obj for module in (chunk_output, chunk_state, l2norm, wy)
          for name, obj in vars(module).items() if hasattr(obj, "all_configs")}
CASES = [(name, i) for name, tuner in sorted(TUNERS.items()) for i in range(len(tuner.all_configs))]
# Segments: ragged, one token, empty, exactly one chunk, more than one chunk.
LENGTHS = [300, 1, 0, 64, 517, 0, 65] if GPU else [30, 1, 0, 64, 70, 0]
RTOL = 5e-3 if GPU else 1e-4  # bf16 against fp32 on the GPU; fp32 against fp64 on the CPU
_DEFAULT = {}  # (rule, K) -> (the reference's outputs and gradients, the default configs' errors)


@pytest.fixture
def pinned(request, monkeypatch):
    """Every tuner on its first config, the named one on config i (a tuner with one config runs it untimed)."""
    name, i = request.param
    for tuner_name, tuner in TUNERS.items():
        monkeypatch.setattr(tuner, "configs", [tuner.all_configs[i if tuner_name == name else 0]])
    return name, i


@pytest.mark.parametrize("K", [64, 256] if GPU else [32])
@pytest.mark.parametrize("pinned", CASES, indirect=True, ids=[f"{n}-{i}" for n, i in CASES])
@pytest.mark.parametrize("rule", ["gated_delta", "gated"])
def test_config_matches_reference(rule, pinned, K, monkeypatch):
    name, i = pinned
    delta = rule == "gated_delta"
    if not delta and name.startswith("wy_"):
        pytest.skip("the gated rule has no WY kernels")
    prune = TUNERS[name].early_config_prune
    if prune and TUNERS[name].all_configs[i] not in prune(TUNERS[name].all_configs, {"K": K, "V": K}):
        pytest.skip(f"the autotuner never runs this config at K = V = {K}")
    kernel, reference = (chunk_gated_delta_rule, chunk_gated_delta_rule_ref) if delta else \
        (chunk_gated_rule, chunk_gated_rule_ref)
    dtype = torch.bfloat16 if GPU else torch.float32
    cu, inputs = varlen_rule_inputs(delta, LENGTHS, 2, K, dtype, torch.Generator().manual_seed(0))
    if (rule, K) not in _DEFAULT:
        exact = [None if x is None else x.detach().to(torch.float32 if GPU else torch.float64).requires_grad_()
                 for x in inputs]
        expected = rule_outputs_and_grads(reference, exact, cu)
        with monkeypatch.context() as defaults:
            for tuner in TUNERS.values():
                defaults.setattr(tuner, "configs", tuner.all_configs[:1])
            _DEFAULT[rule, K] = expected, rule_errors(rule_outputs_and_grads(kernel, inputs, cu), expected, inputs)
    expected, default_errors = _DEFAULT[rule, K]
    errors = rule_errors(rule_outputs_and_grads(kernel, inputs, cu), expected, inputs)
    failed = {n: f"{e:.3e} (default configs {default_errors[n]:.3e})" for n, e in errors.items()
              if e > max(RTOL, 1.25 * default_errors[n])}
    assert not failed, f"relative RMS error > max({RTOL:.1e}, 1.25x the default configs'): {failed}"
