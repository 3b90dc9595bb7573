"""The packed (kernel-path) layer layout against the grouped reference layout, both on the pure-PyTorch references."""

import pytest
import torch
from helpers import random_model, rel_err, small_config

from momctl.modules import short_conv_varlen
from momctl.packing import (
    convolve_copies,
    convolve_projection,
    grouped_linear,
    grouped_linear_bwd,
    pack_tokens,
    project_copies,
)

RULES = ["gated_delta", "delta", "gated", "linear"]


def layer_and_input(seed=0, B=3, T=37, **overrides):
    config = small_config(num_layers=1, **overrides)
    mixer = random_model(config, seed).model.layers[0].attn
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, config.d_model, generator=gen, dtype=torch.float64)
    return mixer, x


def both_paths(mixer, x, valid, state=None):
    grouped = mixer(x, valid, state, True)
    packed = mixer._forward_packed(x, valid, state, True, *mixer.route(x))
    return grouped, packed


def assert_same(grouped, packed, tol=1e-10):
    assert rel_err(packed.y_BTD, grouped.y_BTD) < tol
    assert rel_err(packed.state.memory, grouped.state.memory) < tol
    assert rel_err(packed.state.conv, grouped.state.conv) < tol
    assert torch.equal(packed.tokens_per_memory_E, grouped.tokens_per_memory_E)


@pytest.mark.parametrize("scope", ["segment", "time"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shared", [True, False])
def test_packed_equals_grouped(rule, shared, scope):
    mixer, x = layer_and_input(update_rule=rule, shared_memory=shared, conv_scope=scope)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    assert_same(*both_paths(mixer, x, valid))


@pytest.mark.parametrize("scope", ["segment", "time"])
def test_packed_with_padding_and_a_state_equals_grouped(scope):
    mixer, x = layer_and_input(T=29, conv_scope=scope)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[0, :5] = False  # left padding
    valid[1, 20:] = False  # right padding
    valid[2, 7:9] = False  # a hole
    state = mixer._forward_packed(x, torch.ones_like(valid), None, True, *mixer.route(x)).state
    assert_same(*both_paths(mixer, x.flip(1), valid, state))


@pytest.mark.parametrize("top_k", [1, 4])
def test_packed_all_tokens_to_the_same_memories_and_empty_memories(top_k):
    mixer, x = layer_and_input(top_k=top_k, T=3)  # top-1: some memories get no token; top-4 (= E): all get all
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    assert_same(*both_paths(mixer, x, valid))


def test_single_memory_baseline():
    mixer, x = layer_and_input(num_memories=1, top_k=1, shared_memory=False)
    assert_same(*both_paths(mixer, x, torch.ones(x.shape[:2], dtype=torch.bool)))


@pytest.mark.parametrize("scope", ["segment", "time"])
def test_packed_gradients_equal_grouped(scope):
    mixer, x = layer_and_input(T=21, conv_scope=scope)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[1, :4] = False
    grads = []
    for packed in (False, True):
        mixer.zero_grad()
        xi = x.clone().requires_grad_()
        out = mixer._forward_packed(xi, valid, None, False, *mixer.route(xi)) if packed else mixer(xi, valid, None,
                                                                                                     False)
        (out.y_BTD * torch.linspace(-1, 1, out.y_BTD.numel(), dtype=x.dtype).view_as(out.y_BTD)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in mixer.parameters()])
    for a, b in zip(*grads, strict=True):
        assert rel_err(b, a) < 1e-10


def test_pack_tokens_layout():
    """Slot-major segments in time order, padding copies last, every copy placed once."""
    slots = torch.tensor([[[1, 2], [0, 2], [1, 2]], [[0, 2], [0, 2], [1, 2]]])  # B=2, T=3, A=2, shared slot 2
    weights = torch.rand(2, 3, 2, dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    p = pack_tokens(slots, weights, valid, 3)
    # Segments (s, b): (0,0)=[t1] (0,1)=[t0] (1,0)=[t0,t2] (1,1)=[t2] (2,0)=[t0,t1,t2] (2,1)=[t0,t2], padding=[t1 x2]
    assert p.cu_seqlens.tolist() == [0, 1, 2, 4, 5, 8, 10, 12]
    assert p.token_of_copy_M.tolist() == [1, 3, 0, 2, 5, 0, 1, 2, 3, 5, 4, 4]
    assert p.slot_ends_S.tolist() == [2, 5, 12]
    assert sorted(p.copy_of_token_NA.reshape(-1).tolist()) == list(range(12))
    assert p.weight_NA[4].eq(0).all() and torch.equal(p.weight_NA[0], weights[0, 0])


def test_grouped_linear_uses_each_rows_slot():
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    ends = torch.tensor([2, 2, 7], dtype=torch.int32)  # slot 1 has no rows
    expected = torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T])
    assert rel_err(grouped_linear(x, w, ends), expected) < 1e-14


def grouped_projection_case(dtype, device="cpu", top_k=2, N=12, D=16):
    """Token rows, per-slot weights and a packing where top-1 leaves memories empty (E = 4, shared slot 4)."""
    gen = torch.Generator().manual_seed(3)
    B, T, S = 2, 9, 5
    slots = torch.stack([torch.randperm(S - 1, generator=gen)[:top_k] for _ in range(B * T)]).reshape(B, T, top_k)
    slots = torch.cat([slots, torch.full((B, T, 1), S - 1)], -1)
    if top_k == 1:
        slots[..., 0] = 2  # every token to memory 2: memories 0, 1 and 3 get none
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 6:] = False
    packing = pack_tokens(slots.to(device), torch.rand(B, T, top_k + 1).to(device), valid.to(device), S)
    x = torch.randn(B * T, D, generator=gen).to(device, dtype)
    w = torch.randn(S, N, D, generator=gen).to(device, dtype)
    return x, w, packing


@pytest.mark.parametrize("top_k", [1, 2])
def test_project_copies_gradients_equal_autograd_of_the_gathered_product(top_k):
    x, w, packing = grouped_projection_case(torch.float64, top_k=top_k)
    dy = torch.randn(packing.num_copies, w.shape[1], dtype=torch.float64)
    runs = []
    for fused in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = project_copies(xi, wi, packing) if fused else grouped_linear(xi[packing.token_of_copy_M], wi,
                                                                         packing.slot_ends_S)
        y.backward(dy)
        runs.append((y, xi.grad, wi.grad))
    for actual, expected in zip(*runs[::-1], strict=True):
        assert rel_err(actual, expected) < 1e-12
    if top_k == 1:
        assert runs[1][2][[0, 1, 3]].eq(0).all()


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_convolve_copies_equals_the_conv_of_the_gathered_copies(top_k, with_cache, kernels, monkeypatch):
    """Output, new cache and the gradients of x, the filter and the cache (the new cache in the loss too), on the
    pure-PyTorch conv and on our Triton conv (interpreted); top-1 leaves memories with no tokens."""
    monkeypatch.setenv("MOMCTL_KERNELS", kernels)
    dtype = torch.float64 if kernels == "reference" else torch.float32
    x, _, packing = grouped_projection_case(dtype, top_k=top_k)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(x.shape[1], 4, generator=gen).to(dtype)
    N = packing.cu_seqlens.numel() - 1
    cache = torch.randn(N, 3, x.shape[1], generator=gen).to(dtype) if with_cache else None
    dy = torch.randn(packing.num_copies, x.shape[1], generator=gen).to(dtype)
    dc = torch.randn(N, 3, x.shape[1], generator=gen).to(dtype)
    runs = []
    for fused in (False, True):
        inputs = [t.clone().requires_grad_() for t in (x, weight) + ((cache,) if with_cache else ())]
        xi, wi, ci = inputs[0], inputs[1], inputs[2] if with_cache else None
        if fused:
            y, new_cache = convolve_copies(xi, wi, packing, ci, True)
        else:
            y, new_cache = short_conv_varlen(xi[packing.token_of_copy_M], wi, packing.cu_seqlens, ci, True)
        ((y * dy).sum() + (new_cache * dc).sum()).backward()
        runs.append([y, new_cache] + [t.grad for t in inputs])
    for actual, expected in zip(runs[1], runs[0], strict=True):
        assert rel_err(actual, expected) < (1e-12 if kernels == "reference" else 1e-5)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_convolve_projection_equals_convolving_its_split_columns(top_k, with_cache, kernels, monkeypatch):
    """Convolved groups (widths 5 and 4, the first with W = 4, the second W = 3), gates, new caches and the gradients
    of the projection (one buffer: groups and gates), the filters and the caches, against splitting the projection and
    convolving each group; top-1 leaves memories with no tokens, and gives segments shorter than the filter."""
    monkeypatch.setenv("MOMCTL_KERNELS", kernels)
    dtype = torch.float64 if kernels == "reference" else torch.float32
    _, _, packing = grouped_projection_case(dtype, top_k=top_k)
    gen = torch.Generator().manual_seed(7)
    M, N = packing.num_copies, packing.cu_seqlens.numel() - 1
    widths, filters = [5, 4], [4, 3]
    proj = torch.randn(M, sum(widths) + 2, generator=gen).to(dtype)
    weights = [torch.randn(c, w, generator=gen).to(dtype) for c, w in zip(widths, filters, strict=True)]
    caches = [torch.randn(N, w - 1, c, generator=gen).to(dtype) if with_cache else None
              for c, w in zip(widths, filters, strict=True)]
    d_ys = [torch.randn(M, c, generator=gen).to(dtype) for c in widths]
    d_caches = [torch.randn(N, w - 1, c, generator=gen).to(dtype) for c, w in zip(widths, filters, strict=True)]
    d_gates = torch.randn(M, 2, generator=gen).to(dtype)
    runs = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_() for t in [proj, *weights, *caches] if t is not None]
        pi, wi, ci = leaves[0], leaves[1:3], leaves[3:] if with_cache else [None, None]
        if fused:
            ys, gates, new_caches = convolve_projection(pi, wi, ci, packing.cu_seqlens, True)
        else:
            pieces = pi.split(widths + [2], dim=-1)
            outs = [short_conv_varlen(u, w, packing.cu_seqlens, c, True)
                    for u, w, c in zip(pieces[:2], wi, ci, strict=True)]
            ys, new_caches, gates = [y for y, _ in outs], [c for _, c in outs], pieces[2]
        loss = (gates * d_gates).sum() + sum((y * d).sum() for y, d in zip(ys, d_ys, strict=True))
        loss = loss + sum((c * d).sum() for c, d in zip(new_caches, d_caches, strict=True))
        loss.backward()
        runs.append([*ys, gates, *new_caches] + [t.grad for t in leaves])
    for actual, expected in zip(runs[1], runs[0], strict=True):
        assert rel_err(actual, expected) < (1e-12 if kernels == "reference" else 1e-5)


def test_packed_layer_on_the_kernels_compiles_as_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) through the copy projection and conv functions and the kernels' custom ops
    (interpreted; aot_eager: dynamo and AOT autograd, no code generation), forward and backward equal to eager.
    Two sequences (several segments per memory) rather than three: the interpreted kernels run twice here and take
    nearly all the time, and what is checked is the graph, which a third sequence does not change."""
    monkeypatch.setenv("MOMCTL_KERNELS", "triton")
    mixer, x = layer_and_input(B=2, T=19, head_dim=16)
    mixer, x = mixer.float(), x.float()
    valid = torch.ones(x.shape[:2], dtype=torch.bool)

    def loss(xi):
        return mixer._forward_packed(xi, valid, None, False, *mixer.route(xi)).y_BTD.square().sum()

    runs = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        mixer.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi).backward()
        runs.append([xi.grad] + [p.grad for p in mixer.parameters()])
    for actual, expected in zip(runs[1], runs[0], strict=True):
        assert rel_err(actual, expected) < 1e-5


@pytest.mark.parametrize("N", [12, 13])
def test_grouped_gemm_backward_equals_the_reference_backward(N):
    """The two-grouped-GEMM backward (the CUDA path, run here where this torch has a CPU `_grouped_mm`) against
    autograd through the reference product, with empty slots and a width that needs padding to 8."""
    x, w, packing = grouped_projection_case(torch.bfloat16, top_k=1, N=N)
    x_MD = x[packing.token_of_copy_M]
    dy = torch.randn(packing.num_copies, N).bfloat16()
    try:
        fast = grouped_linear_bwd(x_MD, w, packing.slot_ends_S, dy, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this torch has no CPU grouped GEMM: {error}")
    reference = grouped_linear_bwd(x_MD.double(), w.double(), packing.slot_ends_S, dy.double(), None)
    for actual, expected in zip(fast, reference, strict=True):
        assert actual.shape == expected.shape
        assert rel_err(actual.double(), expected) < 1e-2
    assert fast[1][[0, 1, 3]].eq(0).all()


@pytest.mark.parametrize("scope", ["segment", "time"])
@pytest.mark.parametrize("rule", ["gated_delta", "gated"])
def test_kernel_path_equals_reference_path(rule, scope, monkeypatch):
    """The whole layer on our Triton kernels (interpreted on a CPU) against the pure-PyTorch path, fp32."""
    mixer, x = layer_and_input(T=37, update_rule=rule, conv_scope=scope, head_dim=16)
    mixer, x = mixer.float(), x.float()
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[1, :5] = False
    runs = []
    for choice in ("reference", "triton"):
        monkeypatch.setenv("MOMCTL_KERNELS", choice)
        mixer.zero_grad()
        xi = x.clone().requires_grad_()
        out = mixer(xi, valid, None, True)
        (out.y_BTD * torch.linspace(-1, 1, out.y_BTD.numel()).view_as(out.y_BTD)).sum().backward()
        runs.append([out.y_BTD, out.state.memory, out.state.conv, xi.grad] + [p.grad for p in mixer.parameters()])
    for actual, expected in zip(runs[1], runs[0], strict=True):
        assert rel_err(actual, expected) < 1e-4


def test_kernel_choice_errors_name_the_setting(monkeypatch):
    from momctl.backend import use_kernels

    monkeypatch.setenv("MOMCTL_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MOMCTL_KERNELS='bogus'"):
        use_kernels(torch.zeros(1))
    monkeypatch.setenv("MOMCTL_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        use_kernels(torch.zeros(1))
