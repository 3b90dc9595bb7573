"""The comparison metric of the kernel tests, and the kernel-against-reference check of the chunk kernels."""

import torch
import torch.nn.functional as F

# tests/conftest.py runs the kernels in Triton's interpreter without CUDA; with CUDA they run compiled.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(actual, expected, floor=1e-8):
    """Relative RMS error ||a - b|| / max(||b||, floor); NaN fails."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.isnan().any() and not expected.isnan().any(), "NaN"
    a, b = actual.double(), expected.double()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def assert_close(actual, expected, rtol, floor=1e-8):
    """Relative RMS error <= rtol; NaN fails."""
    err = relative_error(actual, expected, floor)
    assert err <= rtol, f"relative RMS error {err:.3e} > {rtol:.1e}"


def run_and_grads(fn, inputs, grad_o, grad_s, **kw):
    """o, final state and the gradients of <o, grad_o> + <s, grad_s> w.r.t. every given input.

    inputs: the positional inputs of `fn` (q, k, v, [beta,] g), then the initial state; None entries are not given.
    """
    *args, h0 = inputs
    o, s = fn(*args, initial_state=h0, output_final_state=True, **kw)
    leaves = [x for x in inputs if x is not None]
    return o, s, torch.autograd.grad((o * grad_o).sum() + (s * grad_s).sum(), leaves)


def check_against_reference(gen, kernel, reference, inputs, N, rtol, floors=None, **kw):
    """Kernel vs the fp64 reference on the same (fp64 copies of the) inputs: o, state, every gradient.

    floors: an absolute floor of the metric per input index (default 1e-8).
    """
    q, v = inputs[0], inputs[2]
    grad_o = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)
    grad_s = torch.randn(N, q.shape[2], q.shape[3], v.shape[3], generator=gen, dtype=torch.float64).to(v.device)
    o, s, grads = run_and_grads(kernel, inputs, grad_o.to(v.dtype), grad_s.float(), **kw)
    exact = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    o_ref, s_ref, grads_ref = run_and_grads(reference, exact, grad_o, grad_s, **kw)
    assert o.dtype == v.dtype and s.dtype == torch.float32 and s.shape == s_ref.shape
    assert_close(o, o_ref, rtol)
    assert_close(s, s_ref, rtol)
    given = [i for i, x in enumerate(inputs) if x is not None]
    for i, grad, grad_ref in zip(given, grads, grads_ref, strict=True):
        assert grad.dtype == inputs[i].dtype
        assert_close(grad, grad_ref, rtol, (floors or {}).get(i, 1e-8))


def varlen_rule_inputs(delta, lengths, H, K, dtype, gen):
    """cu_seqlens and the leaves q, k, v (in dtype), beta (dtype; None without delta), g (fp32, a realistic decay
    -exp(A_log) softplus(.)) and h0 (fp32, one per segment) of a varlen chunk-rule call with V = K."""
    T, N = sum(lengths), len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = (randn(1, T, H, K).to(dtype) for _ in range(3))
    beta = torch.rand(1, T, H, generator=gen).to(dtype) if delta else None
    g = -torch.rand(H, generator=gen).mul(2).exp() * F.softplus(randn(1, T, H) - 2)
    h0 = randn(N, H, K, K)
    return cu, [None if x is None else x.to(DEVICE).requires_grad_() for x in (q, k, v, beta, g, h0)]


def rule_outputs_and_grads(fn, inputs, cu):
    """[o, final state, the gradient of every given input] of fn(q, k, v, [beta,] g) for fixed random output
    gradients; inputs as from `varlen_rule_inputs` (beta None: the gated family's signature)."""
    q, k, v, beta, g, h0 = inputs
    args = (q, k, v, g) if beta is None else (q, k, v, beta, g)
    o, s = fn(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(1)
    grad_o = torch.randn(o.shape, generator=gen).to(o.dtype).to(DEVICE)
    grad_s = torch.randn(s.shape, generator=gen).to(DEVICE)
    leaves = [x for x in inputs if x is not None]
    return [o, s, *torch.autograd.grad((o.float() * grad_o.float()).sum() + (s * grad_s).sum(), leaves)]


def rule_errors(actual, expected, inputs):
    """{name: relative_error} for o, state and each gradient of `rule_outputs_and_grads`."""
    names = ["o", "state"] + [n for n, x in zip(["dq", "dk", "dv", "dbeta", "dg", "dh0"], inputs, strict=True)
                              if x is not None]
    return {name: relative_error(a, e.to(a.dtype)) for name, a, e in zip(names, actual, expected, strict=True)}


def assert_all_close(actual, expected, inputs, rtol):
    """Every error of `rule_errors` <= rtol, naming the tensors that fail."""
    failed = {name: f"{err:.3e}" for name, err in rule_errors(actual, expected, inputs).items() if err > rtol}
    assert not failed, f"relative RMS error > {rtol:.1e}: {failed}"
