"""State files: generate, save, load, continue == one uninterrupted run; another model's or a broken file is refused
with one line."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from helpers import trained_tiny_run
from test_bad_input import assert_one_line_error

from momctl.errors import MomctlError
from momctl.export import compiled
from momctl.export.step import decode_step
from momctl.generation import SamplingConfig, generate, load_for_inference
from momctl.state import MemoryState
from momctl.state_file import load_state, save_state

GREEDY = ["--temperature", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_inference(run_dir, torch.device("cpu"))


def momctl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "momctl", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_save_load_continue_equals_one_run(run_dir, tmp_path):
    state = tmp_path / "chat.safetensors"
    whole = momctl("generate", run_dir, "--prompt", "Entry 7", "--max-new-tokens", "50", *GREEDY)
    first = momctl("generate", run_dir, "--prompt", "Entry 7", "--max-new-tokens", "20", *GREEDY, "--save-state", state)
    rest = momctl("generate", run_dir, "--max-new-tokens", "30", *GREEDY, "--load-state", state, stdin="")
    assert whole.returncode == first.returncode == rest.returncode == 0, (first.stderr, rest.stderr)
    assert first.stdout[:-1] + rest.stdout[:-1] == whole.stdout[:-1]
    assert len(whole.stdout) > 40


def test_a_new_turn_appends_to_the_loaded_state(loaded, tmp_path):
    greedy = SamplingConfig(max_new_tokens=15, temperature=0)
    turn1 = generate(loaded, ["Entry 7"], greedy, keep_state=True)
    save_state(tmp_path / "s.safetensors", turn1.saved, loaded.model.config, loaded.tokenizer)
    resumed = load_state(tmp_path / "s.safetensors", loaded.model.config, loaded.tokenizer)
    turn2 = generate(loaded, ["\nEntry 12"], greedy, resume=resumed)
    transcript = "Entry 7" + turn1.texts[0] + "\nEntry 12"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(turn1.texts[0])) == turn1.texts[0]
    assert turn2.texts == generate(loaded, [transcript], greedy).texts


class InPlaceStep:
    """Stands in on a CPU for the CUDA-graph `CompiledStep`: a state it returned has its memories advanced in place
    by the next call (a state from elsewhere is copied first, never written)."""

    def __init__(self, model):
        self.model, self.latest = model, None

    def warm_up(self, token_B, state):
        return 0.0

    def __call__(self, token_B, state):
        if state is not self.latest:
            state = state.clone()
        logits, new = decode_step(self.model, token_B, state)
        for old_layer, new_layer in zip(state.layers, new.layers, strict=True):
            if isinstance(old_layer, MemoryState):
                new_layer.memory = old_layer.memory.copy_(new_layer.memory)
        self.latest = new
        return logits, new


@pytest.mark.parametrize("backend", ["eager", "in-place"])
def test_a_sequence_that_stops_keeps_the_state_of_its_text(loaded, backend, monkeypatch):
    """Two sequences, one stops early at EOS: each saved row == the state after exactly its prompt + text (also
    when the step advances the memories in place, as compiled CUDA graphs do)."""
    if backend == "in-place":
        monkeypatch.setattr(compiled, "CompiledStep", InPlaceStep)
        backend = "compile"
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    probe = generate(loaded, ["Entry 7", "Entry 2"], greedy).texts
    eos = loaded.tokenizer.encode(probe[0])[4]  # the 5th token of sequence 0 plays EOS
    tokenizer = type("Eos", (), {"encode": loaded.tokenizer.encode, "decode": loaded.tokenizer.decode,
                                 "eos_id": eos})()
    stopping = replace(loaded, tokenizer=tokenizer)
    result = generate(stopping, ["Entry 7", "Entry 2"], greedy, keep_state=True, backend=backend)
    assert len(result.texts[0]) < len(result.texts[1])
    for i, (prompt, text) in enumerate(zip(["Entry 7", "Entry 2"], result.texts, strict=True)):
        ids = torch.tensor([loaded.tokenizer.encode(prompt + text)])
        logits, alone = loaded.model.prefill(ids)
        saved = result.saved.state
        assert saved.positions[i] == ids.shape[1]
        for got, want in zip(saved.layers, alone.layers, strict=True):
            assert torch.allclose(got.memory[i], want.memory[0], atol=1e-5)
            assert torch.allclose(got.conv[i], want.conv[0], atol=1e-5)
        assert torch.allclose(result.saved.next_logits[i], logits[0, -1], atol=1e-4)


def test_one_saved_sequence_continues_as_several_samples(loaded):
    greedy = SamplingConfig(max_new_tokens=5, temperature=0)
    saved = generate(loaded, ["Entry 3"], greedy, keep_state=True).saved
    result = generate(loaded, ["", ":"], replace(greedy, num_samples=2), resume=saved)
    assert result.texts[0] == result.texts[1] and result.texts[2] == result.texts[3]
    with pytest.raises(MomctlError, match="holds 4 sequences but this run has 2"):
        generate(loaded, ["a", "b"], greedy, resume=saved.repeat(4))


def test_state_of_another_model_names_the_difference(loaded, tmp_path):
    saved = generate(loaded, ["Entry 3"], SamplingConfig(max_new_tokens=3), keep_state=True).saved
    other = loaded.model.config.replace(top_k=1)
    save_state(tmp_path / "other.safetensors", saved, other, loaded.tokenizer)
    with pytest.raises(MomctlError, match=r"another model \(top_k=1 there, 2 here\)"):
        load_state(tmp_path / "other.safetensors", loaded.model.config, loaded.tokenizer)


def test_bad_state_files_are_one_line_errors(run_dir, loaded, tmp_path):
    assert_one_line_error(momctl("generate", run_dir, "--load-state", tmp_path / "none.safetensors"),
                          "not found", "--save-state")
    saved = generate(loaded, ["Entry 3"], SamplingConfig(max_new_tokens=3), keep_state=True).saved
    good = tmp_path / "good.safetensors"
    save_state(good, saved, loaded.model.config, loaded.tokenizer)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    assert_one_line_error(momctl("generate", run_dir, "--load-state", tmp_path / "cut.safetensors"),
                          "not a readable state file")

    def load(name):
        return load_state(tmp_path / name, loaded.model.config, loaded.tokenizer)

    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(MomctlError, match="corrupt"):
        load("flip.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MomctlError, match="not a momctl state file"):
        load("plain.safetensors")
    with pytest.raises(MomctlError, match="cannot write the state file"):
        save_state(tmp_path / "no" / "dir" / "s.safetensors", saved, loaded.model.config, loaded.tokenizer)
