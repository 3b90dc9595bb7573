"""`momctl bench` on the CPU: every mode on the tiny preset, the JSON document, the plot, OOM cells, bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import momctl.bench.run as bench_run
from momctl import MoMForCausalLM, get_preset
from momctl.bench import CELL_FIELDS, SCHEMA, STATUSES, resolve_settings, run_bench
from momctl.bench.models import model_configs
from momctl.bench.state_size import crossover_tokens, state_bytes, state_layout
from momctl.bench.timing import quantile
from momctl.bench.traffic import decode_step_bytes
from momctl.cli import app
from momctl.errors import MomctlError

runner = CliRunner()
TINY = ["--device", "cpu", "--preset", "tiny", "--seq-len", "16,32", "--repeats", "1"]
ENVIRONMENT_KEYS = {"gpu", "driver", "torch", "triton", "python", "commit", "fla"}
# For the compile and onnx backends' whole-model sweeps: which steps are built and reused per model and cell does
# not depend on the depth, while Inductor's C++ build and the ONNX export grow with it (a 2-core CPU).
ONE_LAYER_TINY = get_preset("tiny").replace(num_layers=1)


def settings(**overrides):
    if overrides.get("batch_sizes") is not None:
        overrides.setdefault("batch_tokens", None)
    options = dict(device=torch.device("cpu"), modes="train", models="mom,transformer", seq_lens="16,32", scope=None,
                   batch_tokens=64, batch_sizes=None, dtype="auto", repeats=1, new_tokens=None, backend="eager",
                   baseline=None, profile=False, seed=0)
    return resolve_settings(**{**options, **overrides})


def check_document(doc: dict) -> None:
    """The JSON schema: top-level blocks, environment keys, and every cell with every field and a known status."""
    assert doc["schema"] == SCHEMA and doc["complete"] is True
    assert ENVIRONMENT_KEYS <= set(doc["environment"])
    assert {"modes", "models", "seq_lens", "scope", "dtype", "device", "repeats", "baseline"} <= set(doc["settings"])
    assert set(doc["state"]["per_sequence"]) == {"mom", "gdn", "transformer", "hybrid"}
    s = doc["settings"]
    expected = sum(len(s["models"]) * (len(s["batch_sizes"]) if s["batch_sizes"] else
                                      len(s["decode_batch_sizes"]) if m == "decode" else
                                      len(s["generate_batch_sizes"]) if m == "generate" else 1)
                   for m in s["modes"]) * len(s["seq_lens"])
    assert len(doc["results"]) == expected
    for cell in doc["results"]:
        assert set(CELL_FIELDS) <= set(cell) <= set(CELL_FIELDS) | {"profile"}, cell
        assert cell["status"] in STATUSES
        if cell["status"] == "ok":
            # An ok cell carries a reason only where FLA's reference was timed eagerly under another backend.
            assert cell["reason"] is None or (cell["model"] == "reference" and "eager backend" in cell["reason"])
            assert 0 < cell["p20_ms"] <= cell["median_ms"] <= cell["p80_ms"]
            assert cell["tokens_per_s"] > 0 and cell["warmup_s"] >= 0 and cell["repeats"] == s["repeats"]
            if s["device"] == "cpu":
                assert cell["peak_bytes"] is None  # not measured on a CPU, so not reported
            else:
                assert cell["peak_bytes"] >= cell["base_bytes"] > 0
        else:
            assert cell["reason"] and cell["median_ms"] is None and cell["tokens_per_s"] is None


def json_tail(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,extra", [("train", ["--batch-tokens", "64"]), ("prefill", ["--batch-tokens", "64"]),
                                        ("decode", ["--batch-size", "2"]),
                                        ("generate", ["--batch-size", "1", "--new-tokens", "3"])])
def test_every_mode_runs_on_the_tiny_preset(mode, extra):
    models = "mom,gdn,transformer,hybrid,reference" if mode == "train" else \
        "mom,gdn,transformer,reference" if mode == "prefill" else "mom,transformer,hybrid,reference"
    result = runner.invoke(app, ["bench", *TINY, "--mode", mode, "--models", models, *extra, "--json", "-"])
    assert result.exit_code == 0, result.output
    doc = json_tail(result.stdout)
    check_document(doc)
    status = {(c["model"], c["seq_len"]): c["status"] for c in doc["results"]}
    assert all(v == "ok" for (model, _), v in status.items() if model not in ("reference", "hybrid")), status
    assert all(v == ("skipped" if mode == "train" else "ok") for (m, _), v in status.items() if m == "hybrid")
    # FLA is not a test dependency, and never runs on a CPU: its cells say why they were skipped.
    assert {c["reason"] for c in doc["results"] if c["model"] == "reference"} <= {
        "flash-linear-attention's Triton kernels need a CUDA GPU",
        "flash-linear-attention is not installed (pip install 'momctl[reference]')"}
    assert "reference: skipped" in result.stdout and "vs transformer" in result.stdout
    baseline = [c for c in doc["results"] if c["model"] == "transformer"]
    assert all(c["speedup"] == 1.0 for c in baseline)
    if mode in ("decode", "generate"):
        mom = next(c for c in doc["results"] if c["model"] == "mom")
        # The measured state of a MoM model is its computed fixed size, whatever the context.
        assert mom["state_bytes_per_sequence"] == doc["state"]["per_sequence"]["mom"]["fixed_bytes"]
    if mode == "decode":
        assert all(c["gb_per_s"] > 0 for c in doc["results"] if c["status"] == "ok")
    if mode == "train":
        assert doc["settings"]["scope"] == "layer" and all(c["batch_size"] == 64 // c["seq_len"]
                                                           for c in doc["results"])
        assert all(c["tflops_per_s"] > 0 for c in doc["results"] if c["status"] == "ok")


def test_model_scope_training_json_file_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = runner.invoke(app, ["bench", *TINY, "--seq-len", "16", "--model", "--mode", "train,prefill",
                                 "--models", "mom,hybrid", "--batch-size", "2", "--json", str(out), "--plot",
                                 str(png)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    check_document(doc)
    assert doc["settings"]["scope"] == "model" and doc["settings"]["baseline"] == "mom"
    assert [c["status"] for c in doc["results"]] == ["ok"] * 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_out_of_memory_is_a_cell_and_the_sweep_goes_on(monkeypatch):
    real = bench_run.measure
    freed = []

    def measure(subject, mode, seq_len, *args):
        if subject.name == "mom" and seq_len == 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(subject, mode, seq_len, *args)

    monkeypatch.setattr(bench_run, "measure", measure)
    monkeypatch.setattr(bench_run, "release_memory", lambda device: freed.append(device))
    result = runner.invoke(app, ["bench", *TINY, "--models", "mom,transformer", "--batch-tokens", "64",
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    doc = json_tail(result.stdout)
    check_document(doc)
    status = {(c["model"], c["seq_len"]): c["status"] for c in doc["results"]}
    assert status == {("mom", 16): "ok", ("mom", 32): "oom", ("transformer", 16): "ok", ("transformer", 32): "ok"}
    assert re.search(r"mom\s.*32\s.*OOM", result.stdout)
    assert freed  # memory is released after the failed cell


def test_a_failing_cell_is_reported_and_the_command_fails_at_the_end(monkeypatch):
    def measure(subject, *args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(bench_run, "measure", measure)
    result = runner.invoke(app, ["bench", *TINY, "--models", "mom", "--batch-tokens", "64"])
    assert isinstance(result.exception, MomctlError)
    assert "2 of 2 cells failed" in str(result.exception) and "RuntimeError: kernel exploded" in str(result.exception)
    assert "mom: error (RuntimeError: kernel exploded)" in result.stdout


def test_compile_backend_decodes_like_eager(monkeypatch):
    """The compile backend times CompiledStep (one per model, every cell) on a StepState with KV room."""
    from momctl.export import compiled

    made = []
    real = compiled.CompiledStep
    monkeypatch.setattr(compiled, "CompiledStep", lambda model, **kw: made.append(model) or real(model, **kw))
    doc = run_bench(settings(modes="decode", models="mom,transformer", seq_lens="8", batch_sizes="1,2",
                             backend="compile", repeats=2), ONE_LAYER_TINY, "preset tiny")
    assert doc["settings"]["backend"] == "compile" and len(made) == 2  # one per model, four cells
    assert [c["status"] for c in doc["results"]] == ["ok"] * 4
    assert all(c["tokens_per_s"] > 0 and c["state_bytes_per_sequence"] > 0 for c in doc["results"])


def test_profile_classes_our_kernels_and_onnx_runtimes():
    from momctl.bench.profile import kernel_class

    names = {"chunk_state_fwd_kernel": "recurrence", "fused_mom_step_kernel": "recurrence",
             "void onnxruntime::contrib::cuda::(anonymous namespace)::LinearAttentionDecodeKernel<float, 256>(float "
             "const*)": "recurrence",
             "void onnxruntime::contrib::cuda::(anonymous namespace)::CausalConvDecodeKernelFixedK<float, 4>(float "
             "const*)": "conv", "short_conv_fwd_kernel_out": "conv",
             "void onnxruntime::cuda::cuApplyLayerNorm<__half, float, float, true>(float*)": "norm",
             "nvjet_sm90_hsh_8x64_64x16_2x1_v_bz_TNN": "projections", "flash_fwd_kernel": "attention",
             "void onnxruntime::cuda::_SliceKernel<false, 2, int>()": "routing_and_elementwise"}
    assert {name: kernel_class(name) for name in names} == names


def test_onnx_backend_decodes_and_generates_through_onnx_runtime(monkeypatch):
    """The onnx backend exports a bundle once per MoM model (per KV capacity with attention) and steps it in ONNX
    Runtime from the torch-prefilled state; the bundle folder is gone afterwards."""
    from momctl.bench import backends

    steps = []
    real = backends.OnnxStep
    monkeypatch.setattr(backends, "OnnxStep",
                        lambda model, capacity, ops: steps.append(real(model, capacity, ops)) or steps[-1])
    doc = run_bench(settings(modes="decode,generate", models="mom,transformer", seq_lens="8", batch_sizes="1",
                             backend="onnx", repeats=2, new_tokens=4), ONE_LAYER_TINY, "preset tiny")
    assert [c["status"] for c in doc["results"]] == ["ok"] * 4, doc["results"]
    assert all(c["tokens_per_s"] > 0 for c in doc["results"])
    assert len(steps) == 3  # mom: one bundle; transformer: one per capacity (decode, generate)
    assert all(step.bundle.manifest["ops"] == "onnxruntime" for step in steps)
    folders = [step._folder for step in steps]
    steps.clear()
    import gc

    gc.collect()
    assert not any(folder.exists() for folder in folders)


@pytest.mark.parametrize("ops", ["onnxruntime", "standard"])
def test_onnx_step_continues_the_torch_prefill_exactly(ops):
    """The bundle's logits after a torch prefill equal the eager step's (fp32 on the CPU), in each graph's state
    layouts."""
    from momctl.bench.backends import OnnxStep

    model = MoMForCausalLM(get_preset("tiny").replace(num_layers=2, attention_layers=(1,))).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, prefilled = model.prefill(ids[:, :8])
        want, _ = model.step(ids[:, 8], prefilled)
    step = OnnxStep(model, capacity=16, ops=ops)
    got, _ = step(ids[:, 8], prefilled)
    step.close()
    assert (got - want).abs().max() / want.abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ops", ["onnxruntime", "onnxruntime-cuda"])
def test_onnx_step_on_cuda_leaves_each_steps_logits_on_the_gpu(ops):
    """On CUDA the bundle's logits come back as a view of the runtime's GPU buffer, and over three fed-back steps
    after a torch prefill each step's view holds that step's logits (fp16 graph against the fp32 eager step)."""
    import onnxruntime as ort

    from momctl.bench.backends import OnnxStep

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (its CUDA execution provider)")
    model = MoMForCausalLM(get_preset("tiny").replace(num_layers=2, attention_layers=(1,))).cuda().eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)).cuda()
    step = OnnxStep(model, capacity=16, ops=ops)
    with torch.no_grad():
        _, want_state = model.prefill(ids)
        state, token = want_state, ids[:, -1]
        for _ in range(3):
            got, state = step(token, state)
            want, want_state = model.step(token, want_state)
            assert got.device == want.device and (got - want).abs().max() / want.abs().max() < 2e-2
            token = want.argmax(-1)
    step.close()


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_layer_scope_decode_times_one_layer_step(backend):
    doc = run_bench(settings(modes="decode", models="mom,transformer", scope="layer", seq_lens="8",
                             batch_sizes="1,2", backend=backend, repeats=2), get_preset("tiny"), "preset tiny")
    assert doc["settings"]["scope"] == "layer"
    assert [c["status"] for c in doc["results"]] == ["ok"] * 4
    assert all(c["tokens_per_s"] > 0 for c in doc["results"])
    onnx = run_bench(settings(modes="decode", models="mom", scope="layer", seq_lens="8", batch_sizes="1",
                              backend="onnx"), get_preset("tiny"), "preset tiny")
    assert onnx["results"][0]["status"] == "skipped" and "whole models" in onnx["results"][0]["reason"]


@pytest.mark.parametrize("attention", [False, True])
def test_layer_step_continues_the_layer_prefill(attention):
    """layer_step after layer_prefill of T tokens == the prefill of T + 1 tokens at the last position."""
    from momctl.attention import Attention
    from momctl.bench.layer_decode import layer_prefill, layer_step
    from momctl.mixer import MoMMixer
    from momctl.state import StepState

    config = get_preset("tiny").replace(num_layers=1, attention_layers=(0,) if attention else ())
    torch.manual_seed(0)
    layer = (Attention(config) if attention else MoMMixer(config)).double().eval()
    x = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    with torch.no_grad():
        want, _ = layer_prefill(layer, x, None)
        _, state = layer_prefill(layer, x[:, :8], None)
        got, after = layer_step(layer, x[:, 8], StepState.from_inference(state, capacity=16))
    assert torch.allclose(got, want[:, -1], atol=1e-10)
    assert after.positions.tolist() == [9, 9]


def test_state_sizes_and_crossover_match_the_real_state():
    configs = model_configs(get_preset("tiny"))
    mom, transformer = (state_layout(configs[n], torch.float32) for n in ("mom", "transformer"))
    model = MoMForCausalLM(configs["mom"]).eval()
    for length in (1, 40):
        _, state = model.prefill(torch.randint(0, 100, (3, length)))
        assert state.nbytes // 3 == state_bytes(mom, length) == mom["fixed_bytes"]
    # 2 layers x (k, v) x 16 heads x 4 dims x 4 bytes per token.
    assert transformer["bytes_per_token"] == 2 * 2 * 16 * 4 * 4
    n = crossover_tokens(mom, transformer)
    assert state_bytes(transformer, n) > state_bytes(mom, n) and state_bytes(transformer, n - 1) <= state_bytes(mom, 0)
    assert crossover_tokens(mom, mom) is None


def test_decode_traffic_counts_the_weights_and_the_state_a_step_touches():
    configs = model_configs(get_preset("tiny"))
    for name in ("mom", "transformer"):
        config = configs[name]
        model = MoMForCausalLM(config).to(torch.bfloat16)
        weights = sum(p.nbytes for p in model.parameters())
        assert decode_step_bytes(config, "model", False, 0, 100, torch.bfloat16) == weights
        _, short = model.prefill(torch.randint(0, 100, (1, 10)))
        _, long = model.prefill(torch.randint(0, 100, (1, 30)))
        one = decode_step_bytes(config, "model", False, 1, 10, torch.bfloat16) - weights
        if name == "transformer":  # the KV cache is read whole and one entry written: grows with the context
            grown = decode_step_bytes(config, "model", False, 1, 30, torch.bfloat16) - weights - one
            assert grown == sum(s.keys.nbytes + s.values.nbytes for s in long.layers) - \
                sum(s.keys.nbytes + s.values.nbytes for s in short.layers)
        else:  # top-2 + shared of 5 memories, and every conv window, read and written
            assert one == 2 * sum(s.memory.nbytes * 3 // 5 + s.conv.nbytes for s in short.layers)
            assert decode_step_bytes(config, "model", False, 4, 30, torch.bfloat16) == weights + 4 * one
            mom_layer = model.model.layers[0].attn
            layer_bytes = decode_step_bytes(config, "layer", False, 1, 10, torch.bfloat16)
            assert layer_bytes == sum(p.nbytes for p in mom_layer.parameters()) + one // config.num_layers


def test_quantiles():
    assert quantile([3.0], 0.2) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([1.0, 2.0], 0.8) == pytest.approx(1.8)


@pytest.mark.parametrize("overrides,words", [
    (dict(seq_lens="0"), ["--seq-len", "0", "at least 1"]),
    (dict(seq_lens="12,abc"), ["--seq-len", "'abc'", "whole number"]),
    (dict(seq_lens="1024"), ["--batch-tokens 64", "--seq-len 1024"]),
    (dict(models="mom,mamba"), ["unknown model 'mamba'", "reference"]),
    (dict(models=","), ["--models", "names nothing"]),
    (dict(modes="fast"), ["unknown mode 'fast'", "generate"]),
    (dict(modes="generate", scope="layer"), ["--mode generate", "drop --layer"]),
    (dict(batch_tokens=64, batch_sizes="2"), ["--batch-tokens and --batch-size", "choose one"]),
    (dict(batch_sizes="2,x"), ["--batch-size", "'x'"]),
    (dict(baseline="gdn"), ["--baseline 'gdn'", "--models"]),
    (dict(dtype="int8"), ["--dtype 'int8'"]),
    (dict(repeats=0), ["--repeats 0"]),
    (dict(backend="tensorrt"), ["--backend 'tensorrt'", "eager"]),
])
def test_bad_settings_name_the_option_and_the_fix(overrides, words):
    with pytest.raises(MomctlError) as err:
        settings(**overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_settings_that_have_no_effect_warn():
    with pytest.warns(UserWarning, match="--new-tokens only applies"):
        settings(new_tokens=8)
    with pytest.warns(UserWarning, match="--profile"):
        settings(profile=True)


def test_bad_paths_fail_before_measuring(tmp_path):
    result = runner.invoke(app, ["bench", *TINY, "--json", str(tmp_path / "missing" / "b.json")])
    assert isinstance(result.exception, MomctlError) and "does not exist" in str(result.exception)
    result = runner.invoke(app, ["bench", *TINY, "--preset", "mom-7b"])
    assert isinstance(result.exception, ValueError) and "unknown preset 'mom-7b'" in str(result.exception)


def run_main(*args, hide_matplotlib=False):
    """The real entry point in a fresh process (one red line, exit code, no traceback)."""
    code = ("import sys\n" + ("sys.modules['matplotlib'] = None\n" if hide_matplotlib else "")
            + "from momctl.cli import main\nsys.argv = ['momctl', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def assert_one_line_error(result, *words):
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_cli_errors_are_one_line():
    assert_one_line_error(run_main("bench", "--device", "cpu", "--seq-len", "0"), "--seq-len", "at least 1")
    assert_one_line_error(run_main("bench", "--device", "cpu", "--seq-len", "12,abc"), "--seq-len", "abc")
    assert_one_line_error(run_main("bench", "--device", "cpu", "--models", "mom,mamba"), "unknown model 'mamba'")
    assert_one_line_error(run_main("bench", "--device", "cpu", "--plot", "out.png", hide_matplotlib=True),
                          "matplotlib", "pip install 'momctl[plot]'")


def test_documented_bench_commands_parse(monkeypatch):
    """Every `momctl bench` command in the README resolves to settings (nothing is measured here)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the commands name paths relative to the repository
    readme = (root / "README.md").read_text()
    # Command lines, not the usage synopsis (which has [optional] parts).
    commands = re.findall(r"^momctl bench( [^\n`\[]*)?$", readme, flags=re.M)
    assert len(commands) >= 3
    seen = []

    class Stop(Exception):
        pass

    def stop(settings, *args, **kwargs):
        seen.append(settings)
        raise Stop

    monkeypatch.setattr("momctl.cli.bench.run_bench", stop)
    monkeypatch.setattr("momctl.cli.bench.require_matplotlib", lambda: None)
    for tail in commands:
        args = tail.split() if tail else []
        result = runner.invoke(app, ["bench", *args])
        assert isinstance(result.exception, Stop), (tail, result.output, result.exception)
    assert len(seen) == len(commands)


def test_config_file_sets_the_base_model(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  d_model: 32\n  num_heads: 1\n  num_memories: 3\n")
    result = runner.invoke(app, ["bench", *TINY, "--seq-len", "16", "--models", "mom,gdn", "--batch-tokens", "32",
                                 "--config", str(config), "--json", "-"])
    assert result.exit_code == 0, result.output
    doc = json_tail(result.stdout)
    assert doc["config_source"] == f"config {config}"
    assert doc["configs"]["mom"]["d_model"] == 32 and doc["configs"]["mom"]["num_memories"] == 3
    assert doc["configs"]["gdn"]["num_memories"] == 1 and doc["configs"]["gdn"]["shared_memory"] is False
    assert [c["status"] for c in doc["results"]] == ["ok", "ok"]


def test_commit_is_marked_dirty_when_tracked_files_changed(tmp_path):
    from momctl.bench.environment import _git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert _git_commit(tmp_path) is None  # not a repository
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-q", "-m", "x")
    clean = _git_commit(tmp_path)
    assert clean and re.fullmatch(r"[0-9a-f]{7,}", clean)
    (tmp_path / "untracked.py").write_text("")
    assert _git_commit(tmp_path) == clean
    (tmp_path / "f.py").write_text("a = 2\n")
    assert _git_commit(tmp_path) == f"{clean}+dirty"
