"""momctl generate: prompt sources, batches of prompts, samples, sampling rules."""

import os
import subprocess
import sys

import pytest
import torch

from momctl import prefill
from momctl.generation import SamplingConfig, load_for_inference, sample_next
from momctl.generation import generate as generate_text
from momctl.run_config import build_run_config
from momctl.training import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"Entry {i}: routers pick memories." for i in range(300)), encoding="utf-8")
    run, explicit = build_run_config("tiny", flags={"data.source": str(corpus), "data.seq_len": 32,
                                                     "train.batch_size": 4, "train.steps": 4, "train.save_every": 4})
    train(run, folder / "run", explicit=explicit, reporter=lambda *_: None)
    return folder / "run"


def generate(run_dir, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "momctl", "generate", str(run_dir), "--max-new-tokens", "10", *args],
                          input=stdin, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_prompt_from_a_file_and_from_stdin_equal_the_option(run_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Entry 7", encoding="utf-8")
    outputs = [generate(run_dir, "--temperature", "0", "--prompt", "Entry 7"),
               generate(run_dir, "--temperature", "0", "--prompt-file", tmp_path / "p.txt"),
               generate(run_dir, "--temperature", "0", stdin="Entry 7")]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    assert outputs[0].stdout == outputs[1].stdout == outputs[2].stdout
    assert outputs[0].stdout.startswith("Entry 7") and "tokens/s" in outputs[0].stderr


def test_several_prompts_and_samples_come_back_labelled(run_dir):
    result = generate(run_dir, "--prompt", "Entry 1", "--prompt", "Entry 22", "--num-samples", "2", "--top-p", "0.9")
    assert result.returncode == 0, result.stderr
    for p in (1, 2):
        for s in (1, 2):
            assert f"--- prompt {p}, sample {s}" in result.stdout


def test_batched_greedy_equals_each_prompt_alone(run_dir):
    alone = [generate(run_dir, "--temperature", "0", "--prompt", p).stdout.strip() for p in ("Entry 3", "E")]
    batch = generate(run_dir, "--temperature", "0", "--prompt", "Entry 3", "--prompt", "E").stdout
    assert alone[0] in batch and alone[1] in batch


def test_prompts_longer_than_a_prefill_chunk_continue_exactly(run_dir, monkeypatch):
    """Prompts of different lengths (left-padded) prefilled in 3-token chunks generate what one-chunk prefill does."""
    loaded = load_for_inference(run_dir, torch.device("cpu"))
    prompts, sampling = ["Entry 123: routers", "Entry 9"], SamplingConfig(max_new_tokens=12, temperature=0)
    whole = generate_text(loaded, prompts, sampling).texts
    monkeypatch.setattr(prefill, "PREFILL_CHUNK", 3)
    assert generate_text(loaded, prompts, sampling).texts == whole


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, -9.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    picked = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), gen)
    assert set(picked.tolist()) == {0, 1}
    picked = sample_next(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.5), gen)
    assert set(picked.tolist()) == {0}  # token 0 alone holds ~70% of the mass
    assert sample_next(logits[:3], SamplingConfig(temperature=0), gen).tolist() == [0, 0, 0]


def test_notes_come_after_the_streamed_text_not_inside_its_last_line(run_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "momctl", "generate", str(run_dir), "--max-new-tokens", "4",
                             "--prompt", "Entry 7", "--save-state", str(tmp_path / "s.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Entry 7") and lines[1].startswith("saved the state to"), lines
