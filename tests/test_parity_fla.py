"""Parity with the reference implementation (FLA 0.6.0 `MomForCausalLM`, eval mode, fp32).

The fixture holds FLA's weights and logits, made on the GPU machine by tests/fixtures/make_fla_parity.py. Our model
loads the weights with strict key matching and must reproduce the logits: relative error under 1e-4 where FLA ran its
fp32 recurrent path (<= 64 tokens) and under 2e-3 where it ran its chunk kernels (TF32 dots).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from momctl import MoMForCausalLM
from momctl.fla_compat import config_from_fla, load_fla_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "fla_parity.json").read_text())
TENSORS = load_file(str(FIXTURES / "fla_parity.safetensors"))
TOLERANCE = {"short": 1e-4, "batch": 1e-4, "segments": 1e-4, "long": 2e-3}


def fla_model(tag: str, **overrides) -> MoMForCausalLM:
    config = config_from_fla(META["configs"][tag]).replace(**overrides)
    model = MoMForCausalLM(config)
    prefix = f"{tag}.weights."
    weights = {k[len(prefix):]: v.float() for k, v in TENSORS.items() if k.startswith(prefix)}
    load_fla_state_dict(model, weights)
    return model.eval()


def padded_logits(model: MoMForCausalLM, tag: str, case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, lengths = TENSORS[f"{tag}.{case}.input_ids"], TENSORS[f"{tag}.{case}.lengths"]
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    with torch.no_grad():
        ours = model(ids, attention_mask=mask.long()).logits
    return ours[mask], TENSORS[f"{tag}.{case}.logits"][mask], mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("tag", sorted(META["configs"]))
@pytest.mark.parametrize("case", sorted(META["cases"]))
def test_logits_match_fla(tag, case):
    ours, theirs, _ = padded_logits(fla_model(tag), tag, case)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, theirs) < TOLERANCE[case]


def test_fixture_is_sensitive_to_the_layer():
    """The same weights with the conv over time instead of over segments must miss: the fixture can fail."""
    ours, theirs, _ = padded_logits(fla_model("a", conv_scope="time"), "a", "short")
    assert rel_err(ours, theirs) > 1e-2


def test_state_dict_keys_are_fla_names():
    model = fla_model("a")
    prefix = "a.weights."
    fla_keys = {k[len(prefix):] for k in TENSORS if k.startswith(prefix)}
    assert set(model.state_dict()) == fla_keys
