"""Gated linear attention references: the loop against closed forms, the chunked form against the loop."""

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_close

from momctl.kernels.gated.naive import chunk_gated_rule_ref, recurrent_gated_rule_ref

F64 = torch.float64
RULES = ["gated", "linear"]  # g given / g=None
SHAPES = [(1, 24, 20), (3, 24, 20), (1, 16, 16), (3, 16, 16)]  # (H, K, V)


def make_inputs(gen, B, T, H, K, V, rule, init=True, N=None, dtype=F64):
    """q, k, v, g (None for linear attention) and initial_state [N, H, K, V] (None unless init)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H)) if rule == "gated" else None
    h0 = randn(B if N is None else N, H, K, V) if init else None
    return q, k, v, g, h0


def run_both(q, k, v, g, h0, chunk_size=16, **kw):
    ref = recurrent_gated_rule_ref(q, k, v, g, initial_state=h0, output_final_state=True, **kw)
    out = chunk_gated_rule_ref(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=chunk_size, **kw)
    return ref, out


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("H,K,V", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 200])
@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_loop(gen, rule, T, H, K, V, init):
    (o_ref, s_ref), (o, s) = run_both(*make_inputs(gen, 2, T, H, K, V, rule, init))
    assert o.dtype == F64 and s.dtype == F64 and s.shape == (2, H, K, V)
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)


@pytest.mark.parametrize("T", [65, 200])
@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_loop_default_chunk_size(gen, rule, T):
    q, k, v, g, h0 = make_inputs(gen, 2, T, 3, 24, 20, rule)
    o_ref, s_ref = recurrent_gated_rule_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    o, s = chunk_gated_rule_ref(q, k, v, g, initial_state=h0, output_final_state=True)  # C = 64
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)


@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_loop_without_l2norm_and_custom_scale(gen, rule):
    (o_ref, s_ref), (o, s) = run_both(*make_inputs(gen, 2, 45, 2, 12, 8, rule), use_qk_l2norm=False, scale=0.7)
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_low_precision_inputs(gen, rule, dtype):
    """Low-precision inputs compute in float32: o comes back in v.dtype, the state in float32."""
    inputs = make_inputs(gen, 2, 40, 2, 16, 16, rule, dtype=dtype)
    o_exact, s_exact = recurrent_gated_rule_ref(
        *[None if x is None else x.double() for x in inputs[:4]],
        initial_state=inputs[4].double(),
        output_final_state=True,
    )
    for o, s in run_both(*inputs):
        assert o.dtype == dtype and s.dtype == torch.float32
        assert_close(o, o_exact, 1e-5 if dtype == torch.float32 else 1e-2)
        assert_close(s, s_exact, 1e-5)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_gradients_match(gen, rule, varlen):
    B, T, H, K, V = (1, 41, 2, 12, 10) if varlen else (2, 37, 2, 12, 10)
    cu = torch.tensor([0, 7, 7, 30, 41]) if varlen else None
    inputs = make_inputs(gen, B, T, H, K, V, rule, N=4 if varlen else None)
    inputs = [None if x is None else x.requires_grad_() for x in inputs]
    grad_o = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    grad_s = torch.randn(inputs[4].shape, generator=gen, dtype=F64)
    leaves = [x for x in inputs if x is not None]
    grads = []
    for o, s in run_both(*inputs, chunk_size=8, cu_seqlens=cu):
        grads.append(torch.autograd.grad((o * grad_o).sum() + (s * grad_s).sum(), leaves))
    assert len(leaves) == (5 if rule == "gated" else 4)
    for ref, out in zip(*grads, strict=True):
        assert_close(out, ref, 1e-9)


def closed_form(q, k, v, g, h0):
    """Explicit matrices for T <= 2, one (b, h) at a time: S_1 = a1 S_0 + k1 v1^T,
    S_2 = a2 a1 S_0 + a2 k1 v1^T + k2 v2^T (k normalised, also for linear attention), o_i = K^-1/2 S_i^T q_i."""
    B, T, H, K = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    final = torch.zeros_like(h0)
    for b in range(B):
        for h in range(H):
            qs = [q[b, t, h] / torch.sqrt(q[b, t, h] @ q[b, t, h] + 1e-6) for t in range(T)]
            ks = [k[b, t, h] / torch.sqrt(k[b, t, h] @ k[b, t, h] + 1e-6) for t in range(T)]
            kv = [torch.outer(ks[t], v[b, t, h]) for t in range(T)]
            a = [torch.exp(g[b, t, h]) if g is not None else 1.0 for t in range(T)]
            states = [a[0] * torch.eye(K, dtype=F64) @ h0[b, h] + kv[0]]
            if T == 2:
                states.append(a[1] * a[0] * h0[b, h] + a[1] * kv[0] + kv[1])
            for t, S in enumerate(states):
                o[b, t, h] = K**-0.5 * S.T @ qs[t]
            final[b, h] = states[-1]
    return o, final


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("rule", RULES)
def test_loop_matches_closed_form(gen, rule, T):
    q, k, v, g, h0 = make_inputs(gen, 2, T, 3, 6, 5, rule)
    o, s = recurrent_gated_rule_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    o_cf, s_cf = closed_form(q, k, v, g, h0)
    assert_close(o, o_cf, 1e-13)
    assert_close(s, s_cf, 1e-13)


@pytest.mark.parametrize("T,pad", [(5, 1), (16, 16), (30, 45), (64, 1)])
@pytest.mark.parametrize("rule", RULES)
def test_identity_padding(gen, rule, T, pad):
    """Positions with k = 0, g = 0 (any q, v) leave the state unchanged."""
    q, k, v, g, h0 = make_inputs(gen, 2, T + pad, 2, 12, 10, rule)
    k = torch.cat([k[:, :T], torch.zeros_like(k[:, T:])], 1)
    g = None if g is None else torch.cat([g[:, :T], torch.zeros_like(g[:, T:])], 1)
    cut = [x[:, :T] for x in (q, k, v)] + [None if g is None else g[:, :T]]
    (o_pad, s_pad), (o_pad_c, s_pad_c) = run_both(q, k, v, g, h0)
    (o, s), (o_c, s_c) = run_both(*cut, h0)
    assert torch.equal(s_pad.view(torch.int64), s.view(torch.int64))  # bitwise
    assert torch.equal(o_pad[:, :T], o)
    assert_close(s_pad_c, s_c, 1e-12)
    assert_close(o_pad_c[:, :T], o_c, 1e-12)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("fn", ["loop", "chunk"])
@pytest.mark.parametrize("rule", RULES)
def test_varlen_matches_segments(gen, rule, fn, init):
    lengths = [0, 5, 1, 0, 70, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    H, K, V = 2, 12, 10
    q, k, v, g, h0 = make_inputs(gen, 1, sum(lengths), H, K, V, rule, init, N=len(lengths))
    if fn == "loop":
        f = recurrent_gated_rule_ref
    else:

        def f(*args, **kw):
            return chunk_gated_rule_ref(*args, chunk_size=16, **kw)

    o, s = f(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == v.shape and s.shape == (len(lengths), H, K, V)
    for n, (lo, hi) in enumerate(pairwise(cu.tolist())):
        start = None if h0 is None else h0[n : n + 1]
        if hi == lo:  # an empty segment returns its initial state
            assert torch.equal(s[n], torch.zeros(H, K, V, dtype=F64) if h0 is None else h0[n])
            continue
        seg = [None if x is None else x[:, lo:hi] for x in (q, k, v, g)]
        o_n, s_n = f(*seg, initial_state=start, output_final_state=True)
        assert_close(o[:, lo:hi], o_n, 1e-12)
        assert_close(s[n : n + 1], s_n, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_decay_is_finite(gen, dtype, chunk_size):
    q, k, v, _, h0 = make_inputs(gen, 2, 100, 2, 12, 10, "linear", dtype=dtype)
    g = torch.full((2, 100, 2), -50.0, dtype=dtype)
    leaves = [x.requires_grad_() for x in (q, k, v, g, h0)]
    o, s = chunk_gated_rule_ref(*leaves[:4], initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    assert o.isfinite().all() and s.isfinite().all()
    grads = torch.autograd.grad(o.sum() + s.sum(), leaves)
    assert all(x.isfinite().all() for x in grads)
    o_ref, s_ref = recurrent_gated_rule_ref(*leaves[:4], initial_state=h0, output_final_state=True)
    assert_close(o, o_ref, 1e-5 if dtype == torch.float32 else 1e-10)
    assert_close(s, s_ref, 1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("fn", [recurrent_gated_rule_ref, chunk_gated_rule_ref])
def test_empty_sequence(fn):
    h0 = torch.randn(2, 3, 8, 4, dtype=F64)
    q, v = torch.zeros(2, 0, 3, 8, dtype=F64), torch.zeros(2, 0, 3, 4, dtype=F64)
    o, s = fn(q, q, v, v[..., 0], initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 3, 4) and torch.equal(s, h0)


def test_final_state_only_on_request(gen):
    q, k, v, g, _ = make_inputs(gen, 1, 5, 1, 4, 4, "gated")
    for fn in (recurrent_gated_rule_ref, chunk_gated_rule_ref):
        o, s = fn(q, k, v, g)
        assert o.shape == v.shape and s is None


SMALL = {"B": 2, "T": 6, "H": 3, "K": 8, "V": 4}
BAD = {  # name: (inputs to replace, expected message)
    "q_3d": ({"q": (2, 6, 3)}, r"q has shape \(2, 6, 3\), expected \[B, T, H, K\]"),
    "k_dim": ({"k": (2, 6, 3, 9)}, r"k has shape \(2, 6, 3, 9\), expected \[B, T, H, K\] = \(2, 6, 3, 8\)"),
    "v_time": ({"v": (2, 7, 3, 4)}, r"v has shape \(2, 7, 3, 4\), expected \[B, T, H, V\] = \(2, 6, 3, \*\)"),
    "g_shape": ({"g": (2, 6, 3, 1)}, r"g has shape \(2, 6, 3, 1\), expected \[B, T, H\] = \(2, 6, 3\)"),
    "g_time": ({"g": (2, 5, 3)}, r"g has shape \(2, 5, 3\), expected \[B, T, H\] = \(2, 6, 3\)"),
    "state_n": ({"initial_state": (3, 3, 8, 4)}, r"initial_state has shape \(3, 3, 8, 4\), .* = \(2, 3, 8, 4\)"),
    "state_kv": ({"initial_state": (2, 3, 4, 8)}, r"initial_state has shape \(2, 3, 4, 8\), .* = \(2, 3, 8, 4\)"),
    "varlen_batch": ({"cu_seqlens": torch.tensor([0, 6])}, r"cu_seqlens.*B = 2, expected \[1, T, H, K\]"),
    "int_v": ({"v": torch.zeros(2, 6, 3, 4, dtype=torch.int64)}, r"v must be a floating-point tensor"),
}


def small_inputs(B, T, H, K, V, **change):
    """Valid zero inputs (as keyword arguments), with some replaced: a shape tuple means zeros of that shape."""
    kw = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V), "g": (B, T, H), **change}
    return {name: torch.zeros(x) if isinstance(x, tuple) else x for name, x in kw.items()}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("fn", [recurrent_gated_rule_ref, chunk_gated_rule_ref])
def test_bad_inputs_raise(fn, case):
    change, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        fn(**small_inputs(**SMALL, **change))


@pytest.mark.parametrize(
    "cu,message",
    [
        (torch.tensor([0, 2, 5]), r"from 0 to T = 6, got \[0, 2, 5\]"),
        (torch.tensor([0, 4, 2, 6]), r"non-decreasing"),
        (torch.tensor([0.0, 6.0]), r"integer tensor"),
        (torch.tensor([6]), r"cu_seqlens has shape \(1,\)"),
    ],
)
@pytest.mark.parametrize("fn", [recurrent_gated_rule_ref, chunk_gated_rule_ref])
def test_bad_cu_seqlens_raise(fn, cu, message):
    with pytest.raises(ValueError, match=message):
        fn(**small_inputs(**{**SMALL, "B": 1}, cu_seqlens=cu))


@pytest.mark.parametrize("chunk_size", [0, -16, 16.0, True])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_rule_ref(**small_inputs(**SMALL), chunk_size=chunk_size)
