"""ONNX export and the bundle runtime: ONNX Runtime (CPU) == the eager step over 64 fed-back steps, the three
backends write the same greedy text, the runtime never imports torch, and bad inputs are one-line errors. On a GPU:
the CUDA provider == eager, and its CUDA-graph steppers == its plain session."""

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import random_model, rel_err, small_config, trained_tiny_run
from test_bad_input import assert_one_line_error

from momctl import StepState
from momctl.errors import MomctlError
from momctl.export.onnx_export import export_bundle, export_onnx
from momctl.export.runtime import OnnxBundle
from momctl.tokenizers import ByteTokenizer

STEPS = 64
PROMPTS = ["--prompt", "Entry 7", "--prompt", "Entry 1", "--temperature", "0", "--max-new-tokens", "24"]


def momctl(*args):
    return subprocess.run([sys.executable, "-m", "momctl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny-onnx"
    result = momctl("export", "onnx", run_dir, "--out", out, "--verify-steps", "8")
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime matches PyTorch over 8 steps" in result.stderr and result.stdout.strip() == str(out)
    return out


def fed_back_errors(model, bundle, batch_size=3, steps=STEPS):
    """Relative error of ONNX Runtime's logits against the eager step at each of `steps` fed-back steps (the
    runtime's ping-pong stepper, from an empty state; the same random tokens for both)."""
    tokens = torch.randint(0, model.config.vocab_size, (steps, batch_size), generator=torch.Generator().manual_seed(0))
    capacity = bundle.max_length
    state = StepState.from_inference(model.init_state(batch_size), capacity=capacity)
    stepper = bundle.stepper(bundle.init_state(batch_size))
    errors = []
    for t in range(steps):
        with torch.no_grad():
            want, state = model.step(tokens[t], state)
        errors.append(rel_err(torch.from_numpy(stepper.step(tokens[t].numpy())), want))
    return errors


def assert_replays_after_reset(bundle, batch_size, before=4, after=5):
    """The bundle's stepper of `batch_size`, reset to the state it reached after `before` steps, gives the logits of
    the `after` steps that followed again, and they are the plain `bundle.step`'s from that state. (`before + after`
    odd: when reset, the stepper was to read its second state set next.)"""
    tokens = np.random.default_rng(1).integers(0, bundle.manifest["outputs"][0]["shape"][-1],
                                               (before + after, batch_size))
    stepper = bundle.stepper(bundle.init_state(batch_size))
    for token in tokens[:before]:
        stepper.step(token)
    midway = stepper.state()
    first = [stepper.step(token) for token in tokens[before:]]
    assert bundle.stepper(midway) is stepper
    again = [stepper.step(token) for token in tokens[before:]]
    state = midway
    for t, token in enumerate(tokens[before:]):
        plain, state = bundle.step(token, state)
        assert np.array_equal(first[t], again[t]) and np.array_equal(first[t], plain), (batch_size, t)


def test_bundle_matches_eager_over_64_steps(run_dir, bundle_dir):
    from momctl.generation import load_for_inference

    model = load_for_inference(run_dir, torch.device("cpu")).model
    assert max(fed_back_errors(model, OnnxBundle(bundle_dir, device="cpu"))) < 1e-4


@pytest.mark.parametrize("ops", ["onnxruntime", "standard"])
def test_gdn_with_attention_matches_eager_over_64_steps(tmp_path, ops):
    """The single-memory baseline (no router, no shared memory) and an attention layer with GQA, in one graph."""
    config = small_config(vocab_size=300, num_memories=1, top_k=1, shared_memory=False, attention_layers=(1,),
                          attn_num_kv_heads=2)
    model = random_model(config, dtype=torch.float32)
    report = export_bundle(model, ByteTokenizer(), tmp_path / "b", max_length=STEPS, verify_steps=4, ops=ops)
    assert report.max_rel_error < 1e-4
    bundle = OnnxBundle(tmp_path / "b", device="cpu")
    errors = fed_back_errors(model, bundle)
    assert max(errors) < 1e-4, errors
    # The plain numpy step (session.run) equals the ping-pong stepper (IO binding), and leaves its input alone.
    state = bundle.init_state(2)
    logits, new_state = bundle.step(np.array([5, 7]), state)
    again, _ = bundle.step(np.array([5, 7]), state)
    assert np.array_equal(logits, again) and all(not a.any() for a in state.values())
    assert np.array_equal(bundle.stepper(bundle.init_state(2)).step(np.array([5, 7])), logits)
    stepper = bundle.stepper(bundle.init_state(2))  # advance: the same step, the logits left in its buffer
    stepper.advance(np.array([5, 7]))
    assert np.array_equal(stepper.logits.numpy(), logits) and stepper.current == 1
    assert_replays_after_reset(bundle, 3)  # the positions are reset too


def test_one_stepper_per_batch_size(bundle_dir):
    """`stepper` keeps one stepper (buffers, bindings) per batch size and resets it to each new state."""
    bundle = OnnxBundle(bundle_dir, device="cpu")
    stepper = bundle.stepper(bundle.init_state(2))
    assert bundle.stepper(bundle.init_state(2)) is stepper and not stepper.graphs
    assert_replays_after_reset(bundle, 2)
    assert_replays_after_reset(bundle, 1)
    assert bundle.stepper(bundle.init_state(1)) is not stepper
    with pytest.raises(MomctlError, match="decodes 2 sequences, the state holds 3") as error:
        stepper.reset(bundle.init_state(3))
    assert "\n" not in str(error.value)


def test_manifest_names_follow_the_recurrent_convention(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    names = [spec["name"] for spec in manifest["inputs"]]
    assert names == ["input_ids", "past_key_values.0.recurrent_state", "past_key_values.0.conv_state",
                     "past_key_values.1.recurrent_state", "past_key_values.1.conv_state"]
    shapes = {spec["name"]: spec["shape"] for spec in manifest["inputs"] + manifest["outputs"]}
    # tiny: E=4 + shared memory, H=2, K=V=32, conv channels 3*64 per slot, conv width 4; the fused-op graph takes
    # the memories transposed, one key vector per value column.
    assert shapes["past_key_values.0.recurrent_state"] == ["batch", 10 * 32, 32, 1]
    assert shapes["past_key_values.0.conv_state"] == ["batch", 960, 3]
    assert shapes["logits"] == ["batch", 320] and shapes["present.1.conv_state"] == ["batch", 960, 3]
    assert manifest["state"][0] == {"input": "past_key_values.0.recurrent_state",
                                    "output": "present.0.recurrent_state"}
    assert (bundle_dir / "tokenizer_config.json").is_file() and manifest["opset"] == 18


def test_the_graph_does_not_copy_the_recurrent_state_in_or_out(bundle_dir):
    """ONNX Runtime copies a reshaped graph input or output: the memories must enter the step's arithmetic and leave
    it in their `[B, S*H, K, V]` layout (the recurrent state is most of what a step reads and writes)."""

    graph = onnx.load(str(bundle_dir / "model.onnx"), load_external_data=False).graph
    states = {t.name for t in [*graph.input, *graph.output] if t.name.endswith("recurrent_state")}
    movers = [n.op_type for n in graph.node if n.op_type in ("Reshape", "Transpose", "Identity")
              and {*n.input[:1], *n.output} & states]
    assert len(states) == 4 and not movers, movers


def test_onnx_runtime_fuses_every_rms_norm(bundle_dir, tmp_path):
    """Each MoM layer's q/k L2 norm and the first block's input norm become one SimplifiedLayerNormalization node
    each after ONNX Runtime's graph optimizer, each gated output norm one GatedRMSNorm node, and every other norm one
    SkipSimplifiedLayerNormalization node with the residual add before it (fewer launches per step)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(bundle_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    # tiny: 2 MoM layers; each block's two norms and the final norm are 5, one of them without a residual add
    assert ops["SimplifiedLayerNormalization"] == 1 + 2 and ops["GatedRMSNorm"] == 2, ops
    assert ops["SkipSimplifiedLayerNormalization"] == 4, ops
    assert not ops["Add"] and not ops["Pow"] and not ops["Sigmoid"], ops


def test_eager_compile_and_onnx_write_the_same_greedy_text(run_dir, bundle_dir):
    eager = momctl("generate", run_dir, *PROMPTS)
    compiled = momctl("generate", run_dir, *PROMPTS, "--backend", "compile")
    onnx = momctl("generate", bundle_dir, *PROMPTS, "--backend", "onnx", "--device", "cpu")
    assert eager.returncode == compiled.returncode == onnx.returncode == 0, (compiled.stderr, onnx.stderr)
    assert eager.stdout == compiled.stdout == onnx.stdout
    assert "--- prompt 2" in eager.stdout and "compiled the decode step in" in compiled.stderr


def test_the_runtime_does_not_import_torch(bundle_dir):
    code = ("import sys; from momctl.export.runtime import OnnxBundle; from momctl.sampling import SamplingConfig; "
            f"texts, _ = OnnxBundle({str(bundle_dir)!r}, device='cpu').generate(['Entry 3'], "
            "SamplingConfig(max_new_tokens=5, temperature=0)); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(texts[0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_sampling_in_the_runtime_respects_top_k_and_top_p():
    from momctl.export.runtime import sample_next
    from momctl.sampling import SamplingConfig

    logits = np.tile(np.array([[4.0, 3.0, 2.0, -9.0]], dtype=np.float32), (2000, 1))
    rng = np.random.default_rng(0)
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), rng).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.5), rng).tolist()) == {0}
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_k=None), rng).tolist()) == {0, 1, 2}


def test_bad_export_inputs_are_one_line_errors(run_dir, tmp_path):
    assert_one_line_error(momctl("export", "onnx", tmp_path / "nothing", "--out", tmp_path / "b"), "no checkpoint")
    assert_one_line_error(momctl("export", "onnx", run_dir, "--out", tmp_path / "b", "--dtype", "bf16"),
                          "--dtype bf16", "fp32")
    assert_one_line_error(momctl("export", "onnx", run_dir, "--out", tmp_path / "b", "--opset", "17"),
                          "--opset 17", "18 to 23")
    assert_one_line_error(momctl("export", "onnx", run_dir, "--out", tmp_path / "b", "--ops", "cuda"),
                          "--ops cuda", "standard")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(MomctlError, match="not an empty folder"):
        export_onnx(run_dir, tmp_path / "full")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    weights = next(broken.glob("checkpoints/step-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MomctlError, match="truncated"):
        export_onnx(weights.parent, tmp_path / "b")
    assert not (tmp_path / "b").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_cuda_only_graphs_have_one_gated_delta_net_node_a_layer(tmp_path):
    """Built (not run: GatedDeltaNet has no CPU kernel) for a model with an attention layer: the recurrence, the gates
    and the q/k l2 norm of each MoM layer are one node, whose q, k and v are one Split of the conv's output."""
    from momctl.export.onnx_export import _export_graph
    from momctl.export.onnx_io import io_specs

    model = random_model(small_config(num_layers=3, attention_layers=(1,)), dtype=torch.float32)
    _export_graph(model, tmp_path / "m.onnx", *io_specs(model.config, 8, "onnxruntime-cuda"), 8, 18,
                  "onnxruntime-cuda")
    nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    assert ops["GatedDeltaNet"] == 2 and ops["CausalConvWithState"] == 2 and ops["GatedRMSNorm"] == 2, ops
    assert not ops["LinearAttention"] and not ops["LinearAttentionGate"], ops
    producer = {output: n for n in nodes for output in n.output}

    def source(name):  # the node behind a tensor, through the reshapes that only relabel it
        node = producer[name]
        return source(node.input[0]) if node.op_type in ("Reshape", "Unsqueeze", "Squeeze") else node

    for gdn in (n for n in nodes if n.op_type == "GatedDeltaNet"):
        split = source(gdn.input[0])
        assert split.op_type == "Split" and [source(i) for i in gdn.input[1:3]] == [split, split], gdn
        assert source(split.input[0]).op_type == "CausalConvWithState", split
    # the conv's input is one Concat of the projection's blocks as Split gives them: q once per slot, then k|v
    for conv in (n for n in nodes if n.op_type == "CausalConvWithState"):
        concat = producer[producer[conv.input[0]].input[0]]  # through the Unsqueeze that adds the time axis
        q, *rest = concat.input
        assert concat.op_type == "Concat" and rest == [q] * (model.config.num_slots - 1) + rest[-1:], concat
        assert {producer[i].op_type for i in concat.input} == {"Split"}, concat
    # V = K: the windows are 5-d and the select that keeps untouched ones takes the routing mask through reshapes only
    # (no Gather expanding it), writing the graph output itself; the mixing weights are the scatter's row (no Relu)
    selects = [n for n in nodes if n.op_type == "Where" and n.output[0].endswith("conv_state")]
    assert len(selects) == 2 and all(source(n.input[0]).op_type == "GreaterOrEqual" for n in selects), selects
    assert all(producer[source(n.input[0]).input[0]].op_type == "ScatterElements" for n in selects), selects
    assert not ops["Relu"], ops
    assert [len(i.type.tensor_type.shape.dim) for i in onnx.load(str(tmp_path / "m.onnx")).graph.input
            if i.name.endswith("conv_state")] == [5, 5]


def test_cuda_only_fp16_graphs_run_their_layers_in_fp16_and_type_check_in_onnx_runtime(tmp_path):
    """An fp16 onnxruntime-cuda graph keeps fp16 conv windows and runs its layers in fp16: one Cast a layer (the
    gates, which GatedDeltaNet takes in fp32) and none for the projection, the conv or the norms; the packed
    projections are cut by Splits, not Slices (every node is a launch at decode time). ONNX Runtime type-checks a
    graph when it loads it, before it looks for kernels: on the CPU it must get as far as the missing GatedDeltaNet
    kernel (a graph whose fused ops bind fp16 and fp32 to one type parameter fails earlier, on every provider)."""
    import onnxruntime

    from momctl.export.onnx_export import _cast, _export_graph
    from momctl.export.onnx_io import io_specs
    from momctl.export.step_weights import pack_for_decoding

    layers = 3
    model = _cast(random_model(small_config(num_layers=layers, shared_memory=True)), torch.float16)
    pack_for_decoding(model)
    _export_graph(model, tmp_path / "m.onnx", *io_specs(model.config, 0, "onnxruntime-cuda", "fp16"), 0, 18,
                  "onnxruntime-cuda")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert not ops["Slice"], ops
    # the gates' Cast in each layer, plus the first norm's two (its input is not a residual add) and the logits'
    assert ops["Cast"] == layers + 3, ops
    conv_types = {i.type.tensor_type.elem_type for i in graph.input if i.name.endswith("conv_state")}
    memory_types = {i.type.tensor_type.elem_type for i in graph.input if i.name.endswith("recurrent_state")}
    assert conv_types == {onnx.TensorProto.FLOAT16} and memory_types == {onnx.TensorProto.FLOAT}
    with pytest.raises(Exception, match=r"(implementation|kernel) for (com\.microsoft\.)?GatedDeltaNet"):
        onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(torch.cuda.is_available() and _onnxruntime_has_cuda(), reason="this machine can run them")
def test_cuda_only_graphs_are_one_line_errors_without_cuda(run_dir, bundle_dir, tmp_path):
    assert_one_line_error(momctl("export", "onnx", run_dir, "--out", tmp_path / "b", "--ops", "onnxruntime-cuda"),
                          "onnxruntime-cuda", "--ops onnxruntime")
    assert not (tmp_path / "b").exists()
    relabelled = tmp_path / "relabelled"
    shutil.copytree(bundle_dir, relabelled)
    manifest = json.loads((relabelled / "manifest.json").read_text())
    (relabelled / "manifest.json").write_text(json.dumps({**manifest, "ops": "onnxruntime-cuda"}))
    with pytest.raises(MomctlError, match="CUDA provider: use --device cuda"):
        OnnxBundle(relabelled, device="cpu")


def test_a_stream_is_for_the_cuda_provider_and_advance_without_ids_needs_one(bundle_dir):
    with pytest.raises(MomctlError, match="only on the CUDA provider, and not on the legacy default stream 0") as error:
        OnnxBundle(bundle_dir, device="cpu", stream=1234)
    assert "\n" not in str(error.value)
    bundle = OnnxBundle(bundle_dir, device="cpu")
    stepper = bundle.stepper(bundle.init_state(1))
    with pytest.raises(MomctlError, match="advance\\(None\\) reads ids written on the device"):
        stepper.advance(None)


def test_an_onnxruntime_without_the_fused_ops_is_one_line_at_export(tmp_path, monkeypatch):
    import onnxruntime as ort

    def old_onnxruntime(*args, **kwargs):
        raise ort.capi.onnxruntime_pybind11_state.Fail("Fatal error: com.microsoft:LinearAttention(-1) is not a "
                                                       "registered function/op")

    monkeypatch.setattr(ort, "InferenceSession", old_onnxruntime)
    model = random_model(small_config(num_layers=1), dtype=torch.float32)
    with pytest.raises(MomctlError, match="fused recurrent ops .* upgrade onnxruntime .* --ops standard"):
        export_bundle(model, ByteTokenizer(), tmp_path / "b", verify_steps=1)
    assert not (tmp_path / "b").exists()


def test_a_bundle_that_does_not_match_its_manifest_is_refused(bundle_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["inputs"][2]["shape"] = ["batch", 100, 3]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = momctl("generate", bad, "--backend", "onnx", "--device", "cpu", "--max-new-tokens", "2")
    assert_one_line_error(result, "past_key_values.0.conv_state", "manifest does not belong")
    manifest["inputs"][2]["name"] = "past_key_values.0.conv"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MomctlError, match="'past_key_values.0.conv'"):
        OnnxBundle(bad, device="cpu")
    manifest["inputs"][2]["name"] = "past_key_values.0.conv_state"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    graph = onnx.load(str(bad / "model.onnx"))
    for node in graph.graph.node:  # as an onnxruntime without the fused ops sees the graph
        node.op_type = node.op_type.replace("LinearAttention", "LinearAttentionV9")
    onnx.save(graph, str(bad / "model.onnx"))
    with pytest.raises(MomctlError, match="fused recurrent ops .* upgrade onnxruntime .* --ops standard"):
        OnnxBundle(bad, device="cpu")
    (bad / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(MomctlError, match="cannot load"):
        OnnxBundle(bad, device="cpu")
    (bad / "manifest.json").unlink()
    with pytest.raises(MomctlError, match="no manifest.json"):
        OnnxBundle(bad, device="cpu")
    assert_one_line_error(momctl("generate", bundle_dir, "--backend", "onnx", "--device", "cpu", "--save-state",
                                 tmp_path / "s"), "--save-state")


def test_cuda_on_a_machine_without_a_gpu_is_one_line(bundle_dir, monkeypatch):
    from momctl.export import runtime

    monkeypatch.setattr(runtime, "NVIDIA_DEVICE", "/nonexistent/nvidiactl")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: providers)
    with pytest.raises(MomctlError, match="no NVIDIA GPU .*use --device cpu"):
        OnnxBundle(bundle_dir, device="cuda")
    assert OnnxBundle(bundle_dir, device="auto").device_type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not _onnxruntime_has_cuda(), reason="needs onnxruntime-gpu (its CUDA execution provider)")
@pytest.mark.parametrize("ops", ["onnxruntime", "onnxruntime-cuda"])
def test_a_bundle_on_a_torch_stream_queues_its_steps_and_matches_the_plain_session(tmp_path, ops):
    """On a caller's stream a step is queued, not waited for: behind a 50 ms sleep on that stream `advance` returns
    with the stream still busy. Ids and positions written on the device in stream order (advance(None)) and ids
    from the host (step) give the plain session's logits, over 9 fed-back steps of a model with attention (its
    positions), and `state` and `reset` wait for the queued steps."""
    model = random_model(small_config(vocab_size=300, num_layers=3, attention_layers=(1,)), dtype=torch.float32)
    export_bundle(model, ByteTokenizer(), tmp_path / "b", dtype="fp16", max_length=STEPS, verify_steps=2, ops=ops)
    stream = torch.cuda.Stream()
    bundle, plain = OnnxBundle(tmp_path / "b", device="cuda", stream=stream.cuda_stream), OnnxBundle(tmp_path / "b")
    stepper = bundle.stepper(bundle.init_state(2))
    assert stepper.graphs
    ids, positions = (torch.from_dlpack(v._get_c_value().to_dlpack()) for v in (stepper.input_ids,
                                                                                stepper.position_ids))
    token, state, busy = np.array([5, 7]), plain.init_state(2), []
    for t in range(9):
        want, state = plain.step(token, state)
        if t % 3 == 2:
            got = stepper.step(token)
        else:
            with torch.cuda.stream(stream):
                if t >= 3:  # both directions captured (a capture waits for the device)
                    torch.cuda._sleep(100_000_000)
                ids.copy_(torch.from_numpy(token).cuda(), non_blocking=True)
                positions.copy_(torch.from_numpy(stepper.positions).cuda(), non_blocking=True)
            stepper.advance(None)
            busy.append(not stream.query())
            stream.synchronize()
            got = stepper.logits.numpy()
        assert np.array_equal(got.argmax(-1), want.argmax(-1)), t
        assert rel_err(torch.from_numpy(got), torch.from_numpy(want)) < 1e-2, t
        token = want.argmax(-1)
    assert busy[2:] == [True] * 4, busy
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        ids.copy_(torch.from_numpy(token).cuda(), non_blocking=True)
        positions.copy_(torch.from_numpy(stepper.positions).cuda(), non_blocking=True)
    stepper.advance(None)
    want, state = plain.step(token, state)
    assert all(rel_err(torch.from_numpy(got), torch.from_numpy(want)) < 1e-2  # state() waited for that step
               for got, want in zip(stepper.state().values(), state.values(), strict=True))
    assert_replays_after_reset(bundle, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not _onnxruntime_has_cuda(), reason="needs onnxruntime-gpu (its CUDA execution provider)")
@pytest.mark.parametrize("ops", ["onnxruntime", "onnxruntime-cuda", "standard"])
def test_fp16_bundle_on_the_cuda_provider_matches_eager(tmp_path, ops):
    model = random_model(small_config(vocab_size=300, num_layers=3, attention_layers=(1,)), dtype=torch.float32)
    export_bundle(model, ByteTokenizer(), tmp_path / "b", dtype="fp16", max_length=STEPS, verify_steps=4, ops=ops)
    errors = fed_back_errors(model, OnnxBundle(tmp_path / "b", device="cuda"))
    assert max(errors) < 2e-2, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not _onnxruntime_has_cuda(), reason="needs onnxruntime-gpu (its CUDA execution provider)")
@pytest.mark.parametrize("ops", ["onnxruntime", "onnxruntime-cuda"])
def test_cuda_graph_steppers_match_the_plain_cuda_session(tmp_path, ops):
    """Each batch size's stepper replays CUDA graphs, and over 17 fed-back greedy steps (both ping-pong directions
    captured, then each replayed 7 or 8 times) and again after a reset to a state it reached, it gives the plain
    (graph-less) CUDA session's tokens and logits. Capturing both directions as one graph, or updating the state in
    place, gives other logits."""
    model = random_model(small_config(vocab_size=300, num_layers=3, attention_layers=(1,)), dtype=torch.float32)
    export_bundle(model, ByteTokenizer(), tmp_path / "b", dtype="fp16", max_length=STEPS, verify_steps=4, ops=ops)
    bundle = OnnxBundle(tmp_path / "b", device="cuda")
    steps = 17
    for batch_size in (1, 3):
        stepper = bundle.stepper(bundle.init_state(batch_size))
        assert stepper.graphs and stepper.session is not bundle.session
        token, state, midway, errors = np.arange(5, 5 + batch_size), bundle.init_state(batch_size), None, []
        tokens, plain_logits = [], []
        for t in range(steps):
            tokens.append(token)
            logits = stepper.step(token)
            want, state = bundle.step(token, state)  # session.run on the shared session: no CUDA graphs
            errors.append(rel_err(torch.from_numpy(logits), torch.from_numpy(want)))
            assert np.array_equal(logits.argmax(-1), want.argmax(-1)), (batch_size, t)
            plain_logits.append(want)
            token = want.argmax(-1)
            if t == 4:
                midway = stepper.state()
        assert max(errors) < 1e-2, (batch_size, errors)
        assert all(rel_err(torch.from_numpy(got), torch.from_numpy(want)) < 1e-2
                   for got, want in zip(stepper.state().values(), state.values(), strict=True))
        assert bundle.stepper(midway) is stepper  # 17 steps: reset must make the next step read set 0 again
        for t in range(5, steps):
            logits = stepper.step(tokens[t])
            assert np.array_equal(logits.argmax(-1), plain_logits[t].argmax(-1)), (batch_size, t)
            assert rel_err(torch.from_numpy(logits), torch.from_numpy(plain_logits[t])) < 1e-2, (batch_size, t)
    assert bundle.stepper(bundle.init_state(1)) is not bundle.stepper(bundle.init_state(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not _onnxruntime_has_cuda(), reason="needs onnxruntime-gpu (its CUDA execution provider)")
@pytest.mark.parametrize("ops", ["onnxruntime", "onnxruntime-cuda"])
def test_fp16_cuda_bundle_writes_the_eager_greedy_text_of_a_trained_model(run_dir, tmp_path, ops):
    """fp16 graph with fp32 state on the CUDA provider: the same greedy tokens as the eager fp32 step on the GPU
    over 64 tokens."""
    from momctl.generation import generate, load_for_inference
    from momctl.sampling import SamplingConfig

    export_onnx(run_dir, tmp_path / "b", dtype="fp16", verify_steps=4, ops=ops)
    bundle = OnnxBundle(tmp_path / "b", device="cuda")
    assert "CUDAExecutionProvider" in bundle.session.get_providers()
    sampling = SamplingConfig(max_new_tokens=STEPS, temperature=0, stop_at_eos=False)
    prompts = ["Entry 7", "Entry 1"]
    onnx_texts, _ = bundle.generate(prompts, sampling)
    eager = generate(load_for_inference(run_dir, torch.device("cuda")), prompts, sampling)
    assert onnx_texts == eager.texts
