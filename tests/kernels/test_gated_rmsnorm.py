"""The Triton gated RMSNorm against the reference (interpreted on the CPU): output and every gradient."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from momctl.kernels.norm import gated_rmsnorm as gn
from momctl.kernels.norm.naive import gated_rmsnorm_ref
from momctl.modules import GatedRMSNorm

F64 = torch.float64
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-6


@pytest.fixture
def poison(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element no kernel writes fails the comparison."""
    monkeypatch.setattr(gn, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))


def make_inputs(gen, shape):
    """x, gate [..., D], weight [D] and an upstream gradient, in float64."""

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=F64).to(DEVICE)

    return randn(*shape), randn(*shape), 1 + 0.5 * randn(shape[-1]), randn(*shape)


def run(fn, x, gate, weight, dy, dtype, weight_dtype=None):
    """Output and gradients (x, gate, weight) of fn on copies cast to dtype (the weight to weight_dtype)."""
    leaves = [x.to(dtype), gate.to(dtype), weight.to(weight_dtype or dtype)]
    leaves = [t.requires_grad_() for t in leaves]
    y = fn(*leaves, EPS)
    return y, torch.autograd.grad((y * dy.to(y.dtype)).sum(), leaves)


def test_reference_matches_module(gen, monkeypatch):
    monkeypatch.setenv("MOMCTL_KERNELS", "reference")  # the module's own PyTorch path, on any device
    x, gate, weight, _ = make_inputs(gen, (3, 5, 2, 16))
    norm = GatedRMSNorm(16, EPS).double().to(DEVICE)
    norm.weight.data.copy_(weight)
    assert_close(gated_rmsnorm_ref(x, gate, weight, EPS), norm(x, gate), 1e-14)


@pytest.mark.parametrize("shape", [(2, 7, 3, 20), (1, 48), (300, 33), (5, 256), (9, 5)])
def test_matches_reference(gen, poison, shape):
    """Odd D (masked columns), one row, more rows than one backward program reduces."""
    x, gate, weight, dy = make_inputs(gen, shape)
    y_ref, g_ref = run(gated_rmsnorm_ref, x, gate, weight, dy, F64)
    y, g = run(gn.gated_rmsnorm, x, gate, weight, dy, torch.float32)
    assert y.dtype == torch.float32 and y.shape == shape
    assert_close(y, y_ref, RTOL[torch.float32])
    for actual, expected in zip(g, g_ref, strict=True):
        assert_close(actual, expected, RTOL[torch.float32])


def test_low_precision_inputs(gen, poison):
    """bfloat16 x and gate with the model's float32 weight: y, dx, dgate in bfloat16, dweight in float32."""
    x, gate, weight, dy = make_inputs(gen, (6, 4, 64))
    y_ref, g_ref = run(gated_rmsnorm_ref, x, gate, weight, dy, F64)
    y, g = run(gn.gated_rmsnorm, x, gate, weight, dy, torch.bfloat16, torch.float32)
    assert [t.dtype for t in (y, *g)] == [torch.bfloat16] * 3 + [torch.float32]
    assert_close(y, y_ref, RTOL[torch.bfloat16])
    for actual, expected in zip(g, g_ref, strict=True):
        assert_close(actual, expected, RTOL[torch.bfloat16])


def test_compiles_fullgraph(gen):
    """The custom op traces into one graph (forward and backward) and computes what eager does."""
    x, gate, weight, dy = make_inputs(gen, (2, 3, 24))
    torch._dynamo.reset()
    compiled = torch.compile(gn.gated_rmsnorm, backend="aot_eager", fullgraph=True)
    y, g = run(compiled, x, gate, weight, dy, torch.float32)
    y_eager, g_eager = run(gn.gated_rmsnorm, x, gate, weight, dy, torch.float32)
    assert_close(y, y_eager, 0)
    for actual, expected in zip(g, g_eager, strict=True):
        assert_close(actual, expected, 0)


@pytest.mark.parametrize("change,match", [
    (dict(gate=torch.zeros(4, 9)), "one shape"),
    (dict(weight=torch.zeros(9)), "one shape"),
    (dict(x=torch.zeros(4, 8, dtype=F64)), "float16/bfloat16/float32"),
])
def test_bad_inputs(change, match):
    args = dict(x=torch.zeros(4, 8), gate=torch.zeros(4, 8), weight=torch.ones(8))
    with pytest.raises(ValueError, match=match):
        gn.gated_rmsnorm(**{k: v.to(DEVICE) for k, v in (args | change).items()}, eps=EPS)
