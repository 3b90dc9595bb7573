"""Every bad input: one red line naming the problem and the fix, exit 1 (2 for usage), no traceback, nothing lost."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from momctl.checkpoint import latest_checkpoint
from momctl.errors import MomctlError
from momctl.generation import SamplingConfig, generate, load_for_inference
from momctl.run_config import build_run_config
from momctl.training import train

TEXT = "\n".join(f"Sentence {i} about memories and routers." for i in range(300))
SMALL = ["--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--save-every", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "MOMCTL_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, env) -> Path:
    """A finished 2-step run to break in various ways (each test copies it first)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = subprocess.run([sys.executable, "-m", "momctl", "train", "--data", str(corpus), "--steps", "2",
                             "--out", str(out), *SMALL], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def momctl(env, *args):
    return subprocess.run([sys.executable, "-m", "momctl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_line_error(result, *words, code=1):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    return out


def test_missing_data_path(env, tmp_path):
    """One line, and no run folder left behind (the writability check makes and removes it)."""
    out = tmp_path / "runs" / "r"
    assert_one_line_error(momctl(env, "train", "--data", tmp_path / "nope.txt", "--out", out), "nope.txt")
    assert not (tmp_path / "runs").exists()


def test_empty_corpus(env, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(momctl(env, "train", "--data", tmp_path / "empty.txt", "--out", tmp_path / "r"), "empty")


def test_non_utf8_text(env, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert_one_line_error(momctl(env, "train", "--data", tmp_path / "latin1.txt", "--out", tmp_path / "r"), "UTF-8")


def test_unknown_preset(env, tmp_path):
    assert_one_line_error(momctl(env, "train", "--preset", "mom-7b", "--out", tmp_path / "r"), "mom-7b", "tiny")


@pytest.mark.parametrize("setting,words", [("model.nope=1", ["model.nope"]), ("nope=1", ["SECTION.NAME"]),
                                           ("model.top_k=abc", ["top_k='abc'"]), ("model.top_k", ["KEY=VALUE"])])
def test_bad_set_key_or_value(env, tmp_path, corpus, setting, words):
    result = momctl(env, "train", "--data", corpus, "--set", setting, "--out", tmp_path / "r")
    assert_one_line_error(result, *words)


def test_top_k_larger_than_num_memories(env, tmp_path, corpus):
    result = momctl(env, "train", "--data", corpus, "--set", "model.top_k=9", "--out", tmp_path / "r")
    assert_one_line_error(result, "top_k=9", "num_memories")


def test_seq_len_below_one(env, tmp_path, corpus):
    assert_one_line_error(momctl(env, "train", "--data", corpus, "--seq-len", "0", "--out", tmp_path / "r"),
                          "seq_len=0")


def test_non_numeric_option_is_a_usage_error(env, tmp_path):
    result = momctl(env, "train", "--steps", "many", "--out", tmp_path / "r")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_missing_checkpoint(env, tmp_path):
    assert_one_line_error(momctl(env, "generate", tmp_path / "nothing"), "no checkpoint")


def test_checkpoint_folder_without_manifest(env, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    step = latest_checkpoint(run)
    (step / "manifest.json").unlink()
    assert_one_line_error(momctl(env, "generate", step), "manifest")
    assert_one_line_error(momctl(env, "info", run), "checkpoint")


def test_truncated_safetensors(env, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    step = latest_checkpoint(run)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(momctl(env, "generate", step), "model.safetensors", "truncated")
    flipped = copy_run(trained, tmp_path / "flip")
    weights = latest_checkpoint(flipped) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_one_line_error(momctl(env, "generate", weights.parent), "model.safetensors", "corrupt")


def test_tokenizer_vocabulary_larger_than_the_model(env, tmp_path, corpus):
    result = momctl(env, "train", "--data", corpus, "--set", "model.vocab_size=100", "--out", tmp_path / "r")
    assert_one_line_error(result, "vocab_size=100", "259")


def test_resume_with_a_changed_model_config(env, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    result = momctl(env, "train", "--out", run, "--resume", "auto", "--set", "model.top_k=1", "--steps", "4")
    assert_one_line_error(result, "model.top_k", "changed")


def test_existing_run_needs_resume(env, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    assert_one_line_error(momctl(env, "train", "--out", run), "--resume auto")


def test_an_onnx_bundle_without_backend_onnx(env, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"format": "momctl-onnx-bundle", "version": 1}')
    assert_one_line_error(momctl(env, "generate", bundle), "ONNX bundle", "--backend onnx")


def test_negative_temperature(env, trained):
    assert_one_line_error(momctl(env, "generate", trained, "--temperature", "-1"), "temperature")


def test_prompt_longer_than_the_limit(trained, monkeypatch):
    import momctl.generation as generation

    monkeypatch.setattr(generation, "MAX_PROMPT_TOKENS", 10)
    loaded = load_for_inference(trained, torch.device("cpu"))
    with pytest.raises(MomctlError, match="limit is 10"):
        generate(loaded, ["x" * 11], SamplingConfig(max_new_tokens=2))


def test_output_folder_not_writable(env, tmp_path, corpus):
    (tmp_path / "file").write_text("not a folder")
    assert_one_line_error(momctl(env, "train", "--data", corpus, "--out", tmp_path / "file" / "run"), "not writable")


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    run, explicit = build_run_config("tiny", flags={"data.source": str(corpus), "data.seq_len": 32,
                                                     "train.batch_size": 4, "train.steps": 6, "train.save_every": 2})
    with pytest.raises(MomctlError, match="step 4.*intact"):
        train(run, tmp_path / "run", explicit=explicit, reporter=lambda *_: None)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_cuda_requested_without_a_gpu(env, tmp_path, corpus):
    assert_one_line_error(momctl(env, "train", "--data", corpus, "--device", "cuda", "--out", tmp_path / "r"),
                          "no CUDA GPU")
