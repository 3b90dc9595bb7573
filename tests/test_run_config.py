"""The effective run config: preset < --config file < flags < --set, with clear errors."""

import json
from itertools import pairwise

import pytest

from momctl.errors import MomctlError
from momctl.run_config import build_run_config
from momctl.training import lr_at


def test_precedence_preset_file_flags_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: small\nmodel:\n  top_k: 1\noptim:\n  lr: 0.01\ntrain:\n  steps: 7\n")
    run, explicit = build_run_config("tiny", path, {"train.steps": 9, "data.seq_len": None},
                                     ["optim.lr=0.002", "model.attention_layers=[1]"])
    assert run.preset == "small" and run.model.d_model == 256  # the file's preset
    assert run.model.top_k == 1 and run.train.steps == 9 and run.optim.lr == 0.002
    assert run.model.attention_layers == (1,) and run.data.seq_len == 128
    assert explicit == {"model.top_k", "optim.lr", "train.steps", "model.attention_layers"}


def test_json_config_and_round_trip(tmp_path):
    run, _ = build_run_config("tiny", overrides=["data.source=builtin:all", "model.shared_memory=false"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run.to_dict()))
    again, _ = build_run_config("tiny", path)
    assert again == run and again.data.source == "builtin:all" and again.model.shared_memory is False


@pytest.mark.parametrize("content,words", [("model: [1, 2]\n", "mapping"), ("steps: 3\n", "unknown section"),
                                           ("model:\n  top_k: [\n", "could not be parsed")])
def test_bad_config_files(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises((MomctlError, ValueError), match=words):
        build_run_config("tiny", path)


def test_missing_config_file(tmp_path):
    with pytest.raises(MomctlError, match="does not exist"):
        build_run_config("tiny", tmp_path / "none.yaml")


@pytest.mark.parametrize("item,words", [("train.batch_size=6", "multiple of train.grad_accum"),
                                        ("train.on_nan=maybe", "stop or skip"), ("optim.lr=-1", "optim.lr")])
def test_invalid_values_name_the_setting(item, words):
    with pytest.raises(ValueError, match=words):
        build_run_config("tiny", overrides=["train.grad_accum=4", item] if "batch" in item else [item])


def test_schedule_warms_up_then_decays_to_ten_percent():
    run, _ = build_run_config("tiny", overrides=["optim.warmup_steps=10", "optim.lr=1.0"])
    lrs = [lr_at(s, 200, run.optim) for s in range(200)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in pairwise(lrs[9:]))
    short = [lr_at(s, 20, run.optim) for s in range(20)]  # warmup capped at a tenth of the run
    assert short[1] == pytest.approx(1.0)
