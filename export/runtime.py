"""Run an ONNX bundle (`momctl export onnx`) with ONNX Runtime and numpy only: this module never imports torch.

The graph is one decoding step. Its state tensors are fed back each step in ping-pong: two preallocated sets of
buffers, step t reads set t % 2 and writes the other (IO binding; on the CUDA EP the state never leaves the GPU, only
the token ids go up and the logits come down). Prompts are fed through the same step, one prompt at a time, and the
sequences then decode together.

On the CUDA EP each batch size gets its own session, with the batch axis fixed (so the shape arithmetic folds away
and every node runs on the GPU) and ONNX Runtime's CUDA graphs on: a step replays a captured graph instead of
launching each node from the host. See `PingPongStepper` for why that needs the ping-pong. A caller that keeps its
tokens on the GPU (the bench, with torch) can give the bundle a CUDA stream: the steps are then queued on it and
return without waiting for the GPU (`OnnxBundle`'s `stream`).

Legend: B batch, W vocabulary.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import MomctlError
from ..sampling import GenerationStats, SamplingConfig, TextStreams, encode_prompts
from ..tokenizers import load_saved_tokenizer
from . import BUNDLE_FORMAT

VERSION = 1
MANIFEST = "manifest.json"
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
# Present on a machine with an NVIDIA driver loaded: ONNX Runtime's CUDA provider can load without a GPU, then fails.
NVIDIA_DEVICE = "/dev/nvidiactl"
# ONNX Runtime's com.microsoft ops that `--ops onnxruntime` graphs use (export/ort_ops.py)
FUSED_OPS = ("LinearAttention", "CausalConvWithState", "LinearAttentionGate", "GatedRMSNorm",
             "SkipSimplifiedLayerNormalization")
CUDA_ONLY_OPS = "onnxruntime-cuda"  # graphs on GatedDeltaNet, which has no CPU kernel


class OnnxBundle:
    """An exported bundle, loaded and checked: the manifest, the ONNX Runtime session and the tokenizer.

    `session` is the plain session every batch size can use (`step`, and the steppers on a CPU); on CUDA the steppers
    get a CUDA-graph session per batch size instead (`stepper`).

    Args:
        folder: the bundle folder.
        device: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when ONNX Runtime has it and the machine has an NVIDIA GPU).
        stream: on CUDA, a stream handle (`cudaStream_t` as an int, e.g. `torch.cuda.Stream().cuda_stream`; not the
            legacy default stream 0, on which CUDA graphs cannot be captured) for every session of the bundle to
            run on. A stepper's `advance` then queues its step on that stream and returns without waiting for the
            GPU; the caller orders its own work on the stream (see `PingPongStepper.advance`).
    """

    def __init__(self, folder: str | Path, device: str = "auto", stream: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.device_type, self.device_id = _pick_device(device)
        if stream is not None and (self.device_type != "cuda" or stream == 0):
            raise MomctlError("a bundle runs on a given CUDA stream only on the CUDA provider, and not on the legacy "
                              "default stream 0: pass a stream you created (torch.cuda.Stream().cuda_stream), or none")
        self.stream = stream
        if self.manifest.get("ops") == CUDA_ONLY_OPS and self.device_type != "cuda":
            raise MomctlError(f"{self.folder} was exported with --ops {CUDA_ONLY_OPS}, which runs only on ONNX "
                              f"Runtime's CUDA provider: use --device cuda on a machine with an NVIDIA GPU and "
                              f"onnxruntime-gpu, or export again with --ops onnxruntime")
        provider = ("CUDAExecutionProvider", self._cuda_options()) if self.device_type == "cuda" \
            else "CPUExecutionProvider"
        if self.device_type == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels (as torch installs them)
        try:
            self.session = ort.InferenceSession(str(self.folder / self.manifest["model"]), providers=[provider])
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable models
            raise load_error(self.folder / self.manifest["model"], err, self.manifest.get("ops")) from None
        if self.device_type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise MomctlError("ONNX Runtime could not start its CUDA execution provider (CUDA or cuDNN libraries "
                              "missing?); install onnxruntime-gpu with its CUDA 12/13 libraries or use --device cpu")
        _check_graph(self.folder, self.session, self.manifest)
        self.tokenizer = load_saved_tokenizer(self.folder)
        self.inputs = {spec["name"]: spec for spec in self.manifest["inputs"]}
        self.state = self.manifest["state"]  # [{"input": past name, "output": present name}]
        self.has_positions = "position_ids" in self.inputs
        self.max_length = self.manifest.get("max_length")
        self._steppers: dict[int, PingPongStepper] = {}

    def init_state(self, batch_size: int) -> dict[str, np.ndarray]:
        """An empty state (no tokens seen) for `batch_size` sequences: input name -> zeros."""
        state = {}
        for pair in self.state:
            spec = self.inputs[pair["input"]]
            state[spec["name"]] = np.zeros(_shape(spec, batch_size), dtype=spec["dtype"])
        if self.has_positions:
            state["position_ids"] = np.zeros(batch_size, dtype=np.int64)
        return state

    def step(self, input_ids_B: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One token per sequence with plain numpy arrays: logits `[B, W]` and a new state (`state` is not changed)."""
        feeds = {"input_ids": np.asarray(input_ids_B, dtype=np.int64), **state}
        logits_BW, *present = self.session.run(None, feeds)
        new_state = {pair["input"]: value for pair, value in zip(self.state, present, strict=True)}
        if self.has_positions:
            new_state["position_ids"] = state["position_ids"] + 1
        return logits_BW, new_state

    def stepper(self, state: dict[str, np.ndarray]) -> PingPongStepper:
        """The stepper of this batch size, reset to decode from `state` (`init_state(B)` or a state `step` or a
        stepper returned). There is one per batch size, made on first use with its buffers (and on CUDA its session
        and graphs): a later call with the same batch size resets and returns the same object."""
        batch_size = _batch_size(state)
        stepper = self._steppers.get(batch_size)
        if stepper is None:
            stepper = self._steppers[batch_size] = PingPongStepper(self, state, *self._stepper_session(batch_size))
        else:
            stepper.reset(state)
        return stepper

    def _stepper_session(self, batch_size: int) -> tuple[ort.InferenceSession, bool]:
        """The session a stepper of `batch_size` runs on, and whether it captures CUDA graphs: on CUDA a new session
        with the batch axis fixed and CUDA graphs on, else (or when ONNX Runtime cannot make that one; a warning says
        why) the shared `session`."""
        if self.device_type != "cuda":
            return self.session, False
        options = ort.SessionOptions()
        # The graph's own name for the batch axis (the name the override matches).
        batch_axis = next(i.shape[0] for i in self.session.get_inputs() if i.name == "input_ids")
        options.add_free_dimension_override_by_name(batch_axis, batch_size)
        provider = ("CUDAExecutionProvider", {**self._cuda_options(), "enable_cuda_graph": "1"})
        try:
            # enable_fallback=0: on failure ONNX Runtime would otherwise print to stdout and retry on the CPU.
            session = ort.InferenceSession(str(self.folder / self.manifest["model"]), options, providers=[provider],
                                           enable_fallback=0)
        except Exception as err:  # ONNX Runtime's own exception types
            warnings.warn(f"batch {batch_size} decodes without CUDA graphs: ONNX Runtime cannot make a CUDA-graph "
                          f"session ({_one_line(err)})", stacklevel=3)
            return self.session, False
        return session, True

    def _cuda_options(self) -> dict[str, str]:
        """The CUDA provider's options: the device, and the caller's stream if there is one."""
        options = {"device_id": str(self.device_id)}
        if self.stream is not None:
            options.update(has_user_compute_stream="1", user_compute_stream=str(self.stream))
        return options

    def state_bytes(self, batch_size: int) -> int:
        return sum(a.nbytes for a in self.init_state(batch_size).values())

    def generate(self, prompts: list[str], sampling: SamplingConfig,
                 on_text: Callable[[int, str], None] | None = None) -> tuple[list[str], GenerationStats]:
        """Continue each prompt `num_samples` times, as `momctl.generation.generate` does (greedy decoding gives the
        same tokens; sampling draws from numpy's generator, so samples differ from the torch backends')."""
        encoded = encode_prompts(self.tokenizer, prompts, sampling.num_samples, continuing=False)
        longest = max(len(ids) for ids in encoded)
        if self.max_length is not None and longest + sampling.max_new_tokens > self.max_length:
            raise MomctlError(f"{longest} prompt tokens + --max-new-tokens {sampling.max_new_tokens} exceed the "
                              f"bundle's KV cache of {self.max_length} positions; generate fewer tokens or export "
                              f"with a larger --max-length")
        rng = np.random.default_rng(sampling.seed)
        start = time.perf_counter()
        # Each distinct prompt once, batch 1, then one row per sample.
        rows, logits_rows = [], []
        for p in range(len(prompts)):
            stepper = self.stepper(self.init_state(1))
            for token in encoded[p * sampling.num_samples]:
                logits_1W = stepper.step(np.array([token], dtype=np.int64))
            rows += [stepper.state()] * sampling.num_samples
            logits_rows += [logits_1W] * sampling.num_samples
        state = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
        token_B = sample_next(np.concatenate(logits_rows), sampling, rng)
        first_token_s = time.perf_counter() - start

        B = len(encoded)
        stepper = self.stepper(state)
        streams = TextStreams(self.tokenizer, B, sampling.stop_at_eos, on_text)
        decode_start = time.perf_counter()
        for n in range(sampling.max_new_tokens):
            streams.push(token_B.tolist())
            if streams.all_done or n == sampling.max_new_tokens - 1:
                break
            token_B = sample_next(stepper.step(token_B), sampling, rng)
        decode_s = time.perf_counter() - decode_start
        texts = streams.finish()
        stats = GenerationStats(prompt_tokens=sum(len(e) for e in encoded), new_tokens=streams.new_tokens,
                                time_to_first_token_s=first_token_s,
                                decode_tokens_per_s=streams.new_tokens / max(decode_s, 1e-9),
                                state_bytes_per_sequence=self.state_bytes(1))
        return texts, stats


class PingPongStepper:
    """Steps one batch size with IO binding over buffers on the session's device that never move: the token ids,
    the positions, two sets of state buffers and the logits. Step t reads state set t % 2 and writes the other.

    On CUDA the session captures each direction of the ping-pong (read set 0 and write set 1; read set 1 and write
    set 0) as its own CUDA graph, told apart by the run option `gpu_graph_id`. A captured graph replays the buffer
    addresses it was captured with: the inputs are updated in place (`update_inplace`) and the bindings are made
    once, and a single graph for both directions would replay the first direction on every step (silently wrong
    logits). The state is never updated in place either: the call that captures a graph runs the step more than
    once (ONNX Runtime's warm-up runs, then the capture, replayed for the outputs), which would advance an
    in-place state several times, again with no error (and even without graphs, nodes would overwrite state that
    later nodes of the same step still read). With distinct input and output sets each of those runs computes
    the same step.

    A stepper whose first capture fails (its first step in either direction) warns and goes on with the bundle's
    plain session; `graphs` says whether CUDA graphs are in use. On a CPU the same buffers and bindings serve the
    shared session, without graphs.

    On a bundle with a stream, a step is queued on it and not waited for (ONNX Runtime's run option
    `disable_synchronize_execution_providers`); the stepper itself waits for the GPU before the host reads or
    writes its buffers (`step`'s logits, `state`, `reset`, an `advance` given host ids).
    """

    def __init__(self, bundle: OnnxBundle, state: dict[str, np.ndarray], session: ort.InferenceSession,
                 graphs: bool) -> None:
        self.bundle = bundle
        self.batch_size = _batch_size(state)

        def buffer(spec: dict) -> ort.OrtValue:  # memory ONNX Runtime owns, on the bundle's device
            return ort.OrtValue.ortvalue_from_shape_and_type(_shape(spec, self.batch_size), np.dtype(spec["dtype"]),
                                                             bundle.device_type, bundle.device_id)

        self.input_ids = buffer(bundle.inputs["input_ids"])
        self.position_ids = buffer(bundle.inputs["position_ids"]) if bundle.has_positions else None
        self.buffers = [{pair["input"]: buffer(bundle.inputs[pair["input"]]) for pair in bundle.state}
                        for _ in range(2)]
        self.logits = buffer(bundle.manifest["outputs"][0])
        self.run_options = []
        for graph_id in ("1", "2"):  # one CUDA graph per direction (ignored without CUDA graphs)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", graph_id)
            if bundle.stream is not None:
                options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self.run_options.append(options)
        self._bind(session, graphs)
        self.reset(state)

    def _bind(self, session: ort.InferenceSession, graphs: bool) -> None:
        """Bind the buffers to `session` once per direction: `bindings[i]` reads set i and writes set 1 - i."""
        self.session, self.graphs = session, graphs
        self.to_capture = [graphs, graphs]  # per direction: its first run, which captures its graph, is to come
        self.bindings = []
        for read, write in ((0, 1), (1, 0)):
            binding = session.io_binding()
            binding.bind_ortvalue_input("input_ids", self.input_ids)
            if self.position_ids is not None:
                binding.bind_ortvalue_input("position_ids", self.position_ids)
            for pair in self.bundle.state:
                binding.bind_ortvalue_input(pair["input"], self.buffers[read][pair["input"]])
                binding.bind_ortvalue_output(pair["output"], self.buffers[write][pair["input"]])
            binding.bind_ortvalue_output("logits", self.logits)
            self.bindings.append(binding)

    def reset(self, state: dict[str, np.ndarray]) -> None:
        """Decode from `state` next (same batch size): it is copied into state set 0, which the next step reads."""
        if _batch_size(state) != self.batch_size:
            raise MomctlError(f"this stepper decodes {self.batch_size} sequences, the state holds "
                              f"{_batch_size(state)}: get a stepper of that batch size from bundle.stepper(state)")
        self._wait()
        for name, buffer in self.buffers[0].items():
            buffer.update_inplace(np.ascontiguousarray(state[name], dtype=self.bundle.inputs[name]["dtype"]))
        self.positions = state["position_ids"].astype(np.int64) if self.position_ids is not None else None
        self.current = 0

    def step(self, input_ids_B: np.ndarray) -> np.ndarray:
        """Feed one token per sequence; returns the logits `[B, W]` (on the host)."""
        self.advance(input_ids_B)
        self._wait()
        logits_BW = self.logits.numpy()  # a copy from a GPU; a view of the buffer on a CPU
        return logits_BW.copy() if self.bundle.device_type == "cpu" else logits_BW

    def advance(self, input_ids_B: np.ndarray | None) -> None:
        """Feed one token per sequence and leave the logits in `self.logits`, on the session's device (overwritten by
        the next step). On a bundle with a stream the step is only queued on it, and `input_ids_B` may be None: the
        caller has written the ids into `self.input_ids` on the device, ordered on that stream (and, for graphs with
        positions, `self.positions` into `self.position_ids`)."""
        if input_ids_B is not None:
            self._wait()
            self.input_ids.update_inplace(np.ascontiguousarray(input_ids_B, dtype=np.int64))
            if self.positions is not None:
                self.position_ids.update_inplace(self.positions)
        elif self.bundle.stream is None:
            raise MomctlError("advance(None) reads ids written on the device in stream order: the bundle needs a "
                              "stream (OnnxBundle(..., stream=...)); pass the ids otherwise")
        self._run(self.current)
        self.current = 1 - self.current
        if self.positions is not None:
            self.positions = self.positions + 1

    def _run(self, direction: int) -> None:
        try:
            self.session.run_with_iobinding(self.bindings[direction], self.run_options[direction])
        except Exception as err:  # ONNX Runtime's own exception types
            if not self.to_capture[direction]:
                raise
            # The failed run wrote only the other set: the step runs again from the same state.
            warnings.warn(f"batch {self.batch_size} decodes without CUDA graphs: capturing one failed "
                          f"({_one_line(err)})", stacklevel=3)
            self._bind(self.bundle.session, graphs=False)
            self.session.run_with_iobinding(self.bindings[direction], self.run_options[direction])
        self.to_capture[direction] = False

    def _wait(self) -> None:
        """On a bundle with a stream: wait until the GPU has finished the queued steps."""
        if self.bundle.stream is not None:
            self.bindings[0].synchronize_outputs()  # the CUDA provider waits for the whole device

    def state(self) -> dict[str, np.ndarray]:
        """The current state, copied to the host."""
        self._wait()
        state = {name: value.numpy().copy() for name, value in self.buffers[self.current].items()}
        if self.positions is not None:
            state["position_ids"] = self.positions.copy()
        return state


def sample_next(logits_BW: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Greedy at temperature 0, else temperature, top-k and top-p (nucleus) sampling. Returns ids `[B]` (int64)."""
    if sampling.temperature == 0:
        return logits_BW.argmax(-1).astype(np.int64)
    logits = logits_BW.astype(np.float64) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = np.partition(logits, -sampling.top_k, axis=-1)[:, -sampling.top_k:].min(-1, keepdims=True)
        logits = np.where(logits < kth, -np.inf, logits)
    if sampling.top_p < 1:
        order = np.argsort(-logits, axis=-1)
        probs_sorted = _softmax(np.take_along_axis(logits, order, -1))
        # Drop a token when the tokens before it already hold top_p of the mass (the first always stays).
        drop_sorted = np.cumsum(probs_sorted, -1) - probs_sorted >= sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    cumulative = np.cumsum(_softmax(logits), -1)
    draws = rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative <= draws).sum(-1), logits.shape[-1] - 1).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def load_error(path: Path, err: Exception, ops: str | None) -> MomctlError:
    """The one-line error for a graph at `path` that ONNX Runtime could not load (`err`), made with `ops`."""
    if ops in ("onnxruntime", CUDA_ONLY_OPS) and "com.microsoft" in str(err):
        return MomctlError(f"{path} uses ONNX Runtime's fused recurrent ops ({', '.join(FUSED_OPS)}), which "
                           f"onnxruntime {ort.__version__} lacks: upgrade onnxruntime (1.31 has them) or export with "
                           f"--ops standard")
    return MomctlError(f"ONNX Runtime cannot load {path} ({_one_line(err)}): the file is corrupt or incomplete; "
                       f"export the bundle again")


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise MomctlError(f"no ONNX bundle at {folder}: pass a folder written by momctl export onnx")
    if not path.is_file():
        raise MomctlError(f"{folder} has no {MANIFEST}: it is not a bundle from momctl export onnx (export again)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MomctlError(f"{path} is unreadable ({_one_line(err)}): export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise MomctlError(f"{path} is not a momctl ONNX bundle manifest (no format={BUNDLE_FORMAT!r}); export again")
    if manifest.get("version") != VERSION:
        raise MomctlError(f"{path} is a version {manifest.get('version')!r} bundle, this momctl reads version "
                          f"{VERSION}: export the bundle again with this momctl")
    missing = [key for key in ("model", "inputs", "outputs", "state") if key not in manifest]
    if missing:
        raise MomctlError(f"{path} lacks {', '.join(missing)}: it is corrupt; export the bundle again")
    if not (folder / str(manifest["model"])).is_file():
        raise MomctlError(f"{folder / str(manifest['model'])} is missing: copy the whole bundle folder, or export "
                          f"again")
    return manifest


def _check_graph(folder: Path, session: ort.InferenceSession, manifest: dict) -> None:
    """MomctlError naming the first graph input or output that is not what the manifest says."""
    for kind, actual in (("input", session.get_inputs()), ("output", session.get_outputs())):
        expected = manifest[f"{kind}s"]
        got_names, want_names = [a.name for a in actual], [e["name"] for e in expected]
        if got_names != want_names:
            i = next((i for i, (g, w) in enumerate(zip(got_names, want_names, strict=False)) if g != w),
                     min(len(got_names), len(want_names)))
            got, want = (names[i] if i < len(names) else None for names in (got_names, want_names))
            raise MomctlError(f"{folder}: graph {kind} {i} is {got!r}, {MANIFEST} says {want!r}: the manifest does "
                              f"not belong to this model.onnx; export the bundle again")
        for a, e in zip(actual, expected, strict=True):
            dtype = ORT_TYPES.get(a.type, a.type)
            same_shape = len(a.shape) == len(e["shape"]) and all(
                isinstance(g, str) if isinstance(w, str) else g == w for g, w in zip(a.shape, e["shape"], strict=True))
            if dtype != e["dtype"] or not same_shape:
                raise MomctlError(f"{folder}: graph {kind} {a.name} is {dtype} {list(a.shape)}, {MANIFEST} says "
                                  f"{e['dtype']} {e['shape']}: the manifest does not belong to this model.onnx; "
                                  f"export the bundle again")


def _pick_device(device: str) -> tuple[str, int]:
    """("cpu" | "cuda", device index) for --device."""
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    has_gpu = os.path.exists(NVIDIA_DEVICE)
    if device == "auto":
        return ("cuda", 0) if has_cuda and has_gpu else ("cpu", 0)
    if device == "cpu":
        return "cpu", 0
    if device == "cuda" or device.startswith("cuda:") and device[5:].isdigit():
        if not has_cuda:
            raise MomctlError(f"--device {device}: this ONNX Runtime has no CUDA execution provider; install "
                              f"onnxruntime-gpu or use --device cpu")
        if not has_gpu:
            raise MomctlError(f"--device {device}: this machine has no NVIDIA GPU ({NVIDIA_DEVICE} is missing); "
                              f"use --device cpu")
        return "cuda", int(device.removeprefix("cuda").lstrip(":") or 0)
    raise MomctlError(f"--device {device} is not one of auto, cpu, cuda, cuda:N")


def _batch_size(state: dict[str, np.ndarray]) -> int:
    return next(iter(state.values())).shape[0]


def _shape(spec: dict, batch_size: int) -> tuple[int, ...]:
    return tuple(batch_size if isinstance(d, str) else d for d in spec["shape"])


def _one_line(err: BaseException) -> str:
    text = " ".join((str(err) or type(err).__name__).split())
    return text if len(text) <= 200 else text[:197] + "..."
