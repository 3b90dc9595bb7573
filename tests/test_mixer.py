"""The MoM layer against a token-by-token implementation of the spec (tests/spec_reference.py), in float64."""

import pytest
import torch
from helpers import random_model, rel_err, small_config
from spec_reference import spec_mixer

RULES = ["gated_delta", "delta", "gated", "linear"]


def run_layer(config, T, valid=None, B=2, seed=0, zero_router=False):
    mixer = random_model(config, seed).model.layers[0].attn
    if zero_router:
        with torch.no_grad():
            mixer.gate.weight.zero_()  # every logit equal: every token picks the same A memories
    torch.manual_seed(seed + 1)
    x = torch.randn(B, T, config.d_model, dtype=torch.float64)
    valid_BT = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    with torch.no_grad():
        out = mixer(x, valid_BT, None, False)
    expected = spec_mixer(mixer, x, valid_BT)
    return out, expected, valid_BT


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("scope", ["segment", "time"])
def test_layer_equals_spec(rule, shared, scope):
    config = small_config(update_rule=rule, shared_memory=shared, conv_scope=scope)
    for T in (1, 2, 3, 7, 20):
        out, expected, _ = run_layer(config, T, seed=T)
        assert rel_err(out.y_BTD, expected) < 1e-10, (T, rel_err(out.y_BTD, expected))


@pytest.mark.parametrize("scope", ["segment", "time"])
def test_long_sequence_uses_chunked_path_and_equals_spec(scope):
    out, expected, _ = run_layer(small_config(conv_scope=scope), 70, B=1)
    assert rel_err(out.y_BTD, expected) < 1e-10


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_to_the_same_memories_and_memories_with_no_token(top_k):
    config = small_config(top_k=top_k)
    out, expected, _ = run_layer(config, 9, zero_router=True)
    load = sorted(out.tokens_per_memory_E.tolist(), reverse=True)
    assert load == [2 * 9] * top_k + [0] * (4 - top_k)
    assert rel_err(out.y_BTD, expected) < 1e-10


def test_segments_shorter_than_the_conv_width():
    # 5 tokens over 4 memories with top-2: most segments hold 1-3 tokens (conv width 4).
    out, expected, _ = run_layer(small_config(), 5, B=3)
    assert rel_err(out.y_BTD, expected) < 1e-10


@pytest.mark.parametrize("scope", ["segment", "time"])
def test_padding_left_right_and_inside_is_skipped_exactly(scope):
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[0, :4] = False  # left padding
    valid[1, 9:] = False  # right padding
    valid[2, 5:7] = False  # a gap
    out, expected, valid = run_layer(small_config(conv_scope=scope), 12, valid=valid, B=3)
    assert rel_err(out.y_BTD[valid], expected[valid]) < 1e-10
    assert out.tokens_per_memory_E.sum().item() == 2 * valid.sum().item()


def test_single_memory_has_no_router():
    config = small_config(num_memories=1, top_k=1, shared_memory=False)
    out, expected, _ = run_layer(config, 6)
    assert out.router_logits_BTE is None
    assert rel_err(out.y_BTD, expected) < 1e-10


def test_training_mode_short_sequence_with_shared_memory_runs_and_backpropagates():
    """FLA crashes here (T <= 64, shared memory, training); we must not."""
    model = random_model(small_config(shared_memory=True), dtype=torch.float32).train()
    ids = torch.randint(0, 50, (2, 17))
    out = model(ids, targets=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
