"""momctl train / generate / info end to end: data kinds, exact resume, DDP, NaN handling, golden loss."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from momctl.checkpoint import latest_checkpoint
from momctl.cli import app
from momctl.run_config import build_run_config
from momctl.training import train

SMALL = ["--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--save-every", "2"]
TEXT = "\n".join(f"Line {i}: the memory {i % 4} keeps what the router sends, and forgets slowly." for i in range(400))


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """The built-in corpus cache lives in one temporary folder for the whole module."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MOMCTL_CACHE_DIR")
    os.environ["MOMCTL_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("MOMCTL_CACHE_DIR")
    else:
        os.environ["MOMCTL_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def cli(*args, timeout=300):
    """Run `python -m momctl ARGS` in a real process."""
    return subprocess.run([sys.executable, "-m", "momctl", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_in_process(out: Path, data: Path | str, steps: int, resume=None, reporter=None, **flags):
    run, explicit = build_run_config("tiny", flags={"data.source": str(data), "data.seq_len": 32,
                                                     "train.batch_size": 4, "train.steps": steps,
                                                     "train.eval_every": 2, "train.save_every": 2, **flags})
    return train(run, out, explicit=explicit, resume=resume, reporter=reporter or (lambda *_: None))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


# -- every data kind: train -> generate -> info ---------------------------------------------------------------------

def _data_source(kind: str, tmp: Path, corpus: Path) -> str:
    if kind == "txt":
        return str(corpus)
    if kind == "folder":
        (tmp / "docs" / "sub").mkdir(parents=True)
        (tmp / "docs" / "a.txt").write_text(TEXT[:9000], encoding="utf-8")
        (tmp / "docs" / "sub" / "b.txt").write_text(TEXT[9000:], encoding="utf-8")
        return str(tmp / "docs")
    if kind == "jsonl":
        path = tmp / "docs.jsonl"
        path.write_text("\n".join(json.dumps({"body": line}) for line in TEXT.splitlines()), encoding="utf-8")
        return str(path)
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp / "docs.parquet"
        pq.write_table(pa.table({"body": TEXT.splitlines()}), path)
        return str(path)
    if kind == "bin":
        result = cli("data", "prepare", corpus, "--out", tmp / "corpus.bin")
        assert result.returncode == 0, result.stderr
        return str(tmp / "corpus.bin")
    return {"mqar": "mqar:vocab_size=64,num_pairs=4", "builtin": "builtin:python-docs"}[kind]


@pytest.mark.parametrize("kind", ["txt", "folder", "jsonl", "parquet", "bin", "mqar", "builtin"])
def test_every_data_kind_trains_then_generates_and_infos(kind, tmp_path, corpus):
    source = _data_source(kind, tmp_path, corpus)
    out = tmp_path / "run"
    field = ["--text-field", "body"] if kind in ("jsonl", "parquet") else []
    result = cli("train", "--data", source, *field, "--steps", "3", "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr
    assert f"next: momctl generate {out}" in result.stdout
    assert (out / "run_config.json").exists() and (out / "checkpoints" / "step-00000003").is_dir()
    runner = CliRunner()
    gen = runner.invoke(app, ["generate", str(out), "--prompt", "Line", "--max-new-tokens", "8", "--temperature", "0"])
    assert gen.exit_code == 0, gen.output
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["step"] == 3 and described["parameters"] > described["active_parameters_per_token"] > 0


# -- learning and determinism ---------------------------------------------------------------------------------------

def test_loss_goes_down_on_the_builtin_corpus_into_the_golden_range(tmp_path):
    result = run_in_process(tmp_path / "run", "builtin:python-docs", 60, **{"train.eval_every": 60})
    history = losses(tmp_path / "run")
    assert history[0] > 5.0  # about ln(259) at initialisation
    assert 2.2 < history[-1] < 3.2, history[-1]  # golden range for tiny, seed 0, 60 steps of 4 x 32 tokens
    assert result.val_loss is not None and result.val_loss < history[0] - 2


def test_greedy_and_seeded_generation_are_deterministic(tmp_path, corpus):
    run_in_process(tmp_path / "run", corpus, 6)
    runner = CliRunner()
    outputs = [runner.invoke(app, ["generate", str(tmp_path / "run"), "--prompt", "Line 3", "--max-new-tokens", "12",
                                   *extra]).stdout for extra in (["--temperature", "0"], ["--temperature", "0"],
                                                                 ["--seed", "7"], ["--seed", "7"])]
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3]


# -- exact resume ---------------------------------------------------------------------------------------------------

def test_resume_after_sigterm_is_bitwise_identical(tmp_path, corpus):
    run_in_process(tmp_path / "straight", corpus, 8)

    def send_sigterm_at_step_3(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = run_in_process(tmp_path / "cut", corpus, 8, reporter=send_sigterm_at_step_3)
    assert stopped.stopped_early and stopped.step == 3 and latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    run_in_process(tmp_path / "cut", corpus, 8, resume="auto")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, corpus):
    args = ["train", "--data", corpus, "--steps", "20", *SMALL]
    straight = cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, "-m", "momctl", *map(str, args), "--out", str(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "cut" / "checkpoints" / "step-00000006"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path / "cut") is not None
    assert latest_checkpoint(tmp_path / "cut").name != "step-00000020", "the kill came too late to test anything"
    resumed = cli(*args, "--out", tmp_path / "cut", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_a_real_process_saves_and_exits_0(tmp_path, corpus):
    proc = subprocess.Popen([sys.executable, "-m", "momctl", "train", "--data", str(corpus), "--steps", "100000",
                             "--out", str(tmp_path / "run"), *SMALL, "--save-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "--resume auto" in stdout
    assert latest_checkpoint(tmp_path / "run") is not None


# -- DDP --------------------------------------------------------------------------------------------------------------

def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, corpus):
    common = ["train", "--data", corpus, "--steps", "4", "--seq-len", "32", "--batch-size", "4",
              "--eval-every", "4", "--save-every", "4", "--device", "cpu"]
    single = cli(*common, "--grad-accum", "2", "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    ddp = cli(*common, "--nproc", "2", "--out", tmp_path / "ddp", timeout=600)
    assert ddp.returncode == 0, ddp.stderr + ddp.stdout
    assert torch.allclose(torch.tensor(losses(tmp_path / "ddp")), torch.tensor(losses(tmp_path / "single")),
                          rtol=1e-5, atol=1e-6)
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# -- NaN ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def nan_at_step_4(monkeypatch):
    """Poison the loss of the 4th forward pass in training mode."""
    from momctl import model as model_module

    original = model_module.MoMForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_module.MoMForCausalLM, "forward", forward)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus, nan_at_step_4):
    from momctl.errors import MomctlError

    with pytest.raises(MomctlError, match="NaN/inf at step 4.*step-00000002"):
        run_in_process(tmp_path / "run", corpus, 8)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"


def test_nan_skip_finishes_the_run(tmp_path, corpus, nan_at_step_4):
    result = run_in_process(tmp_path / "run", corpus, 6, **{"train.on_nan": "skip"})
    assert result.step == 6 and latest_checkpoint(tmp_path / "run").name == "step-00000006"
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "train_log.jsonl").read_text().splitlines())] == \
        [1, 2, 3, 5, 6]


# -- other options ----------------------------------------------------------------------------------------------------

def test_init_from_starts_a_fresh_run_from_those_weights(tmp_path, corpus):
    run_in_process(tmp_path / "base", corpus, 4)
    run, explicit = build_run_config("tiny", flags={"data.source": str(corpus), "data.seq_len": 32,
                                                     "train.batch_size": 4, "train.steps": 2, "train.save_every": 2})
    result = train(run, tmp_path / "tuned", explicit=explicit, init_from=str(tmp_path / "base"),
                   reporter=lambda *_: None)
    assert result.step == 2
    fresh = run_in_process(tmp_path / "fresh", corpus, 2)
    assert result.history[0]["loss"] < fresh.history[0]["loss"] - 0.3  # starts from the trained weights


def test_max_tokens_sets_the_number_of_steps(tmp_path, corpus):
    result = run_in_process(tmp_path / "run", corpus, 100, **{"train.max_tokens": 3 * 4 * 32})
    assert result.step == 3


def test_compile_trains_like_eager(tmp_path, corpus):
    # One layer: the compiled training step (forward, aux loss, backward) is the same code whatever the depth, and
    # the second layer's share of Inductor's C++ build was about a quarter of this test's time on a 2-core CPU.
    one_layer = {"model.num_layers": 1}
    eager = run_in_process(tmp_path / "eager", corpus, 2, **one_layer)
    compiled = run_in_process(tmp_path / "compiled", corpus, 2, **{"train.compile": True}, **one_layer)
    assert abs(compiled.history[0]["loss"] - eager.history[0]["loss"]) < 1e-4


def test_init_from_takes_the_checkpoint_model_and_refuses_a_different_one(tmp_path, corpus):
    from momctl.errors import MomctlError

    run_in_process(tmp_path / "base", corpus, 2)
    run, explicit = build_run_config("small", flags={"data.source": str(corpus), "data.seq_len": 32,
                                                      "train.batch_size": 4, "train.steps": 2})
    result = train(run, tmp_path / "tuned", explicit=explicit, init_from=str(tmp_path / "base"),
                   reporter=lambda *_: None)
    saved = json.loads((tmp_path / "tuned" / "run_config.json").read_text())
    assert result.step == 2 and saved["model"]["d_model"] == 64  # tiny's width, not small's
    run, explicit = build_run_config("tiny", overrides=[f"data.source={corpus}", "model.top_k=1"])
    with pytest.raises(MomctlError, match="model.top_k=2"):
        train(run, tmp_path / "refused", explicit=explicit, init_from=str(tmp_path / "base"))
