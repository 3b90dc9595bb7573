"""Model-level behaviour: configs, presets, gradients, losses, router statistics."""

import pytest
import torch
from helpers import random_model, small_config

from momctl import PRESETS, ModelConfig, MoMForCausalLM, get_preset
from momctl.fla_compat import config_from_fla, config_to_fla
from momctl.losses import global_balance_loss, layerwise_balance_loss


@pytest.mark.parametrize("field,value,words", [
    ("top_k", 5, "top_k=5"),
    ("update_rule", "mamba", "update_rule='mamba'"),
    ("conv_scope", "space", "conv_scope='space'"),
    ("aux_loss", "none", "aux_loss='none'"),
    ("d_model", 0, "d_model=0"),
    ("expand_v", 0.3, "expand_v=0.3"),
    ("attention_layers", (2, 9), "attention_layers=(2, 9)"),
    ("attn_num_heads", 3, "attn_num_heads=3"),
    ("conv_size", 1, "conv_size=1"),
])
def test_config_errors_name_the_field_the_value_and_the_fix(field, value, words):
    with pytest.raises(ValueError) as info:
        ModelConfig(**{"num_layers": 4, "num_memories": 4, "d_model": 64, field: value})
    message = str(info.value)
    assert words in message and "expected" in message


def test_config_round_trips_through_dict_and_rejects_unknown_fields():
    config = small_config(attention_layers=(1,), conv_scope="time")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**config.to_dict(), "num_experts": 4})


def test_config_round_trips_through_fla_keys():
    config = small_config(attention_layers=(1,), tie_embeddings=True)
    assert config_from_fla(config_to_fla(config)).replace(mlp_hidden_ratio=3.0) == config
    with pytest.raises(ValueError, match="single_kv_proj"):
        config_from_fla({**config_to_fla(config), "single_kv_proj": True})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("mom-7b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_fla_names(name):
    config = get_preset(name)
    with torch.device("meta"):
        model = MoMForCausalLM(config)
    keys = set(model.state_dict())
    assert "model.embeddings.weight" in keys and "model.norm.weight" in keys
    assert ("lm_head.weight" in keys) != config.tie_embeddings
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        assert {prefix + n for n in ("attn_norm.weight", "mlp_norm.weight", "mlp.gate_proj.weight",
                                     "mlp.up_proj.weight", "mlp.down_proj.weight", "attn.q_proj.weight",
                                     "attn.o_proj.weight")} <= keys
        if not config.is_attention_layer(i):
            assert prefix + f"attn.k_proj.{config.num_memories - 1}.weight" in keys
            assert (prefix + "attn.gate.weight" in keys) == (config.num_memories > 1)
            assert (prefix + "attn.shared_k.weight" in keys) == config.shared_memory


def test_paper_340m_layer_shapes():
    config = get_preset("mom-340m")
    assert (config.d_model, config.num_layers, config.num_heads, config.head_dim, config.head_v_dim) == \
        (1024, 24, 4, 256, 256)
    assert (config.num_memories, config.top_k, config.shared_memory, config.mlp_size) == (4, 2, True, 2048)
    assert get_preset("mom-1.3b").mlp_size == 5632


@pytest.mark.parametrize("overrides", [dict(), dict(update_rule="linear", conv_scope="time"),
                                       dict(num_layers=3, attention_layers=(1,)), dict(aux_loss="layerwise")])
def test_gradients_reach_every_parameter(overrides):
    model = random_model(small_config(**overrides), dtype=torch.float32).train()
    ids = torch.randint(0, 50, (2, 40))
    model(ids, targets=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_loss_never_includes_the_aux_loss():
    model = random_model(small_config(), dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 30))
    train_out = model.train()(ids, targets=ids)
    eval_out = model.eval()(ids, targets=ids)
    assert train_out.aux_loss is not None and train_out.aux_loss > 0
    assert torch.allclose(train_out.loss, train_out.ce_loss + 0.01 * train_out.aux_loss)
    assert eval_out.aux_loss is None and torch.equal(eval_out.loss, eval_out.ce_loss)
    assert torch.allclose(eval_out.ce_loss, train_out.ce_loss)


def test_router_statistics_count_real_tokens_per_memory():
    model = random_model(small_config(top_k=2), dtype=torch.float32)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :6] = 0
    out = model(torch.randint(0, 50, (2, 16)), attention_mask=mask)
    assert out.tokens_per_memory.shape == (2, 4)
    assert out.tokens_per_memory.sum(1).tolist() == [2 * 26, 2 * 26]


def test_global_balance_loss_matches_its_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 4)  # layers, batch, time, memories
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, :2] = False
    rows = logits[:, valid]  # [3, N, 4]
    rows = rows.reshape(-1, 4)
    probs = rows.softmax(-1)
    chosen = probs.topk(2, -1).indices
    f = torch.stack([torch.stack([(chosen[:, j] == e).float().mean() for e in range(4)]) for j in range(2)])
    expected = 4 * (f * probs.mean(0)).sum()
    assert torch.allclose(global_balance_loss(logits, valid, 2), expected)


def test_layerwise_balance_loss_matches_its_definition():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, 4)
    valid = torch.ones(3, 6, dtype=torch.bool)
    expected = []
    for layer in logits:
        top = layer.topk(2, -1)
        w = torch.zeros_like(layer).scatter(-1, top.indices, top.values.softmax(-1))
        chosen = torch.zeros_like(layer).scatter(-1, top.indices, 1.0)
        expected.append(16 * (chosen.mean(1) * w.mean(1)).mean())
    assert torch.allclose(layerwise_balance_loss(logits, valid, 2), torch.stack(expected).mean())
    uniform = torch.zeros(1, 3, 6, 4)  # every logit equal: perfectly balanced probabilities
    assert layerwise_balance_loss(uniform, valid, 2) > 0
