"""GPU checks of the chunk kernels at real shapes: bf16 kernels against the fp32 chunked reference (output, final
state, every gradient), a 32K-token sequence, no host synchronisation, torch.compile. Run on the GPU machine:
`pytest -m gpu tests/kernels/test_chunk_gpu.py` (the first run compiles and autotunes for minutes)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RTOL = 5e-3  # relative RMS error of every compared tensor, bf16 kernels vs fp32 reference
H = 4
# Segment lengths: empty, shorter than a chunk, exactly one chunk, ragged multi-chunk, long.
LENGTHS = [300, 1, 0, 64, 1024, 517, 65, 2000, 33, 0, 700]
RULES = {"gated_delta": (True, True), "delta": (True, False), "gated": (False, True), "linear": (False, False)}
# (K = V, layout): K = 64 runs every kernel at BK = 64, where Triton 3.4-3.7 miscompiles FLA's gated backward on
# Hopper (FLA issue #640); "batch" is B = 3 sequences of 1000 positions without cu_seqlens.
SHAPES = [(64, "varlen"), (128, "batch"), (256, "varlen")]


def kernel_and_reference(rule):
    """(kernel, reference) of rule, both called as f(q, k, v, beta, g, **kw); beta is dropped without delta."""
    from momctl.kernels.gated import chunk_gated_rule
    from momctl.kernels.gated.naive import chunk_gated_rule_ref
    from momctl.kernels.gated_delta import chunk_gated_delta_rule
    from momctl.kernels.gated_delta.naive import chunk_gated_delta_rule_ref

    delta, _ = RULES[rule]
    if delta:
        return chunk_gated_delta_rule, chunk_gated_delta_rule_ref
    return (lambda q, k, v, beta, g, **kw: chunk_gated_rule(q, k, v, g, **kw),
            lambda q, k, v, beta, g, **kw: chunk_gated_rule_ref(q, k, v, g, **kw))


def make_inputs(rule, B, T, K, N, seed=0, dtype=torch.bfloat16):
    """q, k, v, beta in dtype; fp32 g (a realistic decay: -exp(A_log) softplus(.)) and h0; all leaves."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    delta, gated = RULES[rule]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k, v = randn(B, T, H, K).to(dtype), randn(B, T, H, K).to(dtype), randn(B, T, H, K).to(dtype)
    beta = torch.rand(B, T, H, generator=gen, device="cuda").to(dtype) if delta else None
    g = -torch.rand(H, generator=gen, device="cuda").mul(2).exp() * F.softplus(randn(B, T, H) - 2) if gated else None
    h0 = randn(N, H, K, K)
    return [None if x is None else x.requires_grad_() for x in (q, k, v, beta, g, h0)]


def grads_of(fn, inputs, grad_o, grad_s, **kw):
    q, k, v, beta, g, h0 = inputs
    o, s = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True, **kw)
    leaves = [x for x in inputs if x is not None]
    return [o, s, *torch.autograd.grad((o.float() * grad_o).sum() + (s * grad_s).sum(), leaves)]


def errors_against_reference(rule, inputs, **kw):
    """Relative RMS errors of o, final state and every gradient, kernel (bf16) vs reference (fp32 copies)."""
    kernel, reference = kernel_and_reference(rule)
    v, h0 = inputs[2], inputs[5]
    gen = torch.Generator(device="cuda").manual_seed(1)
    grad_o = torch.randn(v.shape, generator=gen, device="cuda").bfloat16().float()
    grad_s = torch.randn(h0.shape, generator=gen, device="cuda")
    actual = grads_of(kernel, inputs, grad_o, grad_s, **kw)
    exact = [None if x is None else x.detach().float().requires_grad_() for x in inputs]
    expected = grads_of(reference, exact, grad_o, grad_s, **kw)
    names = ["o", "state"] + [n for n, x in zip(["dq", "dk", "dv", "dbeta", "dg", "dh0"], inputs, strict=True)
                              if x is not None]
    errors = {}
    for name, a, e in zip(names, actual, expected, strict=True):
        assert not a.isnan().any(), f"{name} has NaN (an unwritten element?)"
        errors[name] = ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-8)).item()
    return errors


@pytest.fixture(autouse=True)
def exact_reference_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("K,layout", SHAPES)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_bf16_matches_fp32_reference(poison_chunk_buffers, rule, K, layout):
    if layout == "varlen":
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device="cuda")
        inputs = make_inputs(rule, 1, sum(LENGTHS), K, len(LENGTHS))
        errors = errors_against_reference(rule, inputs, cu_seqlens=cu)
    else:
        inputs = make_inputs(rule, 3, 1000, K, 3)
        errors = errors_against_reference(rule, inputs)
    print(rule, K, layout, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= RTOL, errors


@pytest.mark.parametrize("rule", sorted(RULES))
def test_fp32_inputs_at_k256_match_reference(poison_chunk_buffers, rule):
    """fp32 inputs take other kernel configs (the pipelined ones need more shared memory than an H100 has at K=256);
    the recurrence kernels then multiply in tf32, hence the looser bound than fp32 alone would give."""
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device="cuda")
    inputs = make_inputs(rule, 1, sum(LENGTHS), 256, len(LENGTHS), dtype=torch.float32)
    errors = errors_against_reference(rule, inputs, cu_seqlens=cu)
    print(rule, "fp32", {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= 2e-3, errors


def test_32k_sequence_matches_reference(poison_chunk_buffers):
    inputs = make_inputs("gated_delta", 1, 32768, 256, 1)
    errors = errors_against_reference("gated_delta", inputs)
    print("gated_delta 32K", {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= RTOL, errors


@pytest.mark.parametrize("rule", ["gated_delta", "gated"])
def test_forward_backward_makes_no_host_synchronisation(rule):
    kernel, _ = kernel_and_reference(rule)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device="cuda")
    q, k, v, beta, g, h0 = make_inputs(rule, 1, sum(LENGTHS), 256, len(LENGTHS))

    def step():
        o, s = kernel(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        (o.float().sum() + s.sum()).backward()

    step()  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_torch_compile_fullgraph_matches_eager():
    kernel, _ = kernel_and_reference("gated_delta")
    inputs = make_inputs("gated_delta", 1, 500, 128, 2)
    cu = torch.tensor([0, 137, 500], device="cuda")

    def loss(q, k, v, beta, g, h0):
        o, s = kernel(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return o.float().square().sum() + s.sum()

    expected = torch.autograd.grad(loss(*inputs), inputs)
    actual = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*inputs), inputs)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, 1e-6)
