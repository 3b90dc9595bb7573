"""The packed (kernel-path) layer layout against the grouped reference layout, both on the pure-PyTorch references."""

import pytest
import torch
from helpers import random_model, rel_err, small_config

from momctl.packing import grouped_linear, pack_tokens

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
