"""The decoding step a benchmark times, per `--backend`:

- `eager`: the model's own `step` (the static step in PyTorch).
- `compile`: `momctl.export.compiled.CompiledStep` (torch.compile; on CUDA ping-pong CUDA graphs), made once per
  model; the prefilled state becomes a `StepState` with KV room for every step the cell makes. The prompt's prefill
  replays a CUDA graph per chunk (`momctl.prefill.GraphedPrefill`) where the model allows, as `momctl generate`.
- `onnx`: the model exported to a temporary bundle (fp16 graph on CUDA, fp32 on a CPU) and stepped by ONNX Runtime
  with IO binding and device-resident ping-pong state (`momctl.export.runtime`); the prefill stays in PyTorch and
  its state is handed to the bundle's layout. On CUDA ONNX Runtime runs on a torch stream of the bench's: the token
  is copied into the runtime's input buffer on the GPU and the step is queued without a host sync, and the logits
  stay on the GPU (a view of the runtime's buffer), as the other backends' steps do; a step's time is ONNX
  Runtime's. The bundle is deleted with the step. `onnx`
  exports with ONNX Runtime's fused recurrent ops (`momctl export onnx`'s default), `onnx-cuda` with the recurrence
  on its CUDA-only GatedDeltaNet (`--ops onnxruntime-cuda`), `onnx-standard` with standard ONNX ops only.

At layer scope (`--layer --mode decode`) the step is one layer's (bench/layer_decode.py) on random activations:
eager or compile; onnx exports whole models only. FLA's reference models and layers decode eagerly only: under
another backend run.py times them with `eager` and says so in the cell's `reason`.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import MomctlError
from .models import Subject, Unavailable

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


def check_backend(backend: str) -> None:
    """MomctlError now, before any measurement, when `backend` cannot run here (settings.py checks the name)."""
    if backend.startswith("onnx") and importlib.util.find_spec("onnxruntime") is None:
        raise MomctlError(f"--backend {backend} needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu for "
                          f"CUDA)")


def step_function(subject: Subject, backend: str, capacity: int) -> StepFn:
    """The step of `subject` under `backend`. `capacity`: KV-cache positions the cell's steps can reach (prompt +
    every step the cell makes)."""
    assert subject.step is not None, "decoding needs a subject with a step"
    if backend == "eager":
        return subject.step if subject.scope == "model" or subject.is_reference else _with_step_state(
            subject.step, capacity)
    if backend == "compile":
        return _compiled_step(subject, capacity)
    if subject.scope == "layer":
        raise Unavailable("the onnx backend exports whole models; use --model")
    if backend == "onnx-cuda" and subject.module.output_weight.device.type != "cuda":
        raise Unavailable("onnx-cuda graphs run on ONNX Runtime's CUDA provider only; use --device cuda")
    key = (backend, capacity if subject.config.attention_layers else 0)  # a MoM state does not grow: one export
    if key not in subject.backends:
        ops = {"onnx": "onnxruntime", "onnx-cuda": "onnxruntime-cuda", "onnx-standard": "standard"}[backend]
        subject.backends[key] = OnnxStep(subject.module, capacity, ops)
    return subject.backends[key]


def graphed_prefill(subject: Subject):
    """The subject's CUDA-graph prompt prefill (`momctl.prefill.GraphedPrefill`, made once per model; its graphs
    serve every cell), or None where the model does not allow one (CPU, attention layers, FLA, layer scope)."""
    from ..prefill import GraphedPrefill

    if subject.scope != "model" or subject.is_reference or not GraphedPrefill.supports(subject.module):
        return None
    if "prefill" not in subject.backends:
        subject.backends["prefill"] = GraphedPrefill(subject.module)
    return subject.backends["prefill"]


def _compiled_step(subject: Subject, capacity: int) -> StepFn:
    from ..export.compiled import CompiledStep
    from ..export.step import decode_step
    from .layer_decode import layer_step

    # Each model, batch size and KV capacity compiles the step anew; a sweep makes more than dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if "compile" not in subject.backends:  # one CompiledStep per model: its graphs serve every cell
        subject.backends["compile"] = CompiledStep(subject.module,
                                                   step_fn=decode_step if subject.scope == "model" else layer_step)
    return _with_step_state(subject.backends["compile"], capacity)


def _with_step_state(step: StepFn, capacity: int) -> StepFn:
    """`step` taking a prefill's state too: converted once to a `StepState` with KV room for `capacity`."""
    from ..state import StepState

    def with_state(inputs: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        if not isinstance(state, StepState):
            state = StepState.from_inference(state, capacity=capacity)
        return step(inputs, state)
    return with_state


class OnnxStep:
    """The model as an ONNX bundle under ONNX Runtime, stepped like `MoMForCausalLM.step`: `state` is the torch
    prefill state on the first call, then the returned `OnnxState` (the runtime's ping-pong buffers)."""

    def __init__(self, model: torch.nn.Module, capacity: int, ops: str) -> None:
        from ..export import DEFAULT_MAX_LENGTH
        from ..export.onnx_export import export_bundle
        from ..export.runtime import OnnxBundle
        from ..tokenizers import ByteTokenizer

        self.device = model.output_weight.device
        self._folder = Path(tempfile.mkdtemp(prefix="momctl-bench-onnx-"))
        cpu_model = copy.deepcopy(model).float().cpu()
        on_cuda = self.device.type == "cuda"
        # ONNX Runtime's steps go on this stream (not the legacy default stream: no CUDA graph is captured there)
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        try:
            export_bundle(cpu_model, ByteTokenizer(), self._folder / "bundle", dtype="fp16" if on_cuda else "fp32",
                          max_length=capacity if model.config.attention_layers else DEFAULT_MAX_LENGTH,
                          verify_steps=2, ops=ops)
            self.bundle = OnnxBundle(self._folder / "bundle", device=f"cuda:{self.device.index or 0}" if on_cuda
                                     else "cpu", stream=self.stream.cuda_stream if on_cuda else None)
        except BaseException:
            self.close()
            raise
        self.capacity = capacity

    def __call__(self, token_ids_B: torch.Tensor, state: Any) -> tuple[torch.Tensor, OnnxState]:
        if not isinstance(state, OnnxState):
            state = OnnxState(self.bundle.stepper(self._onnx_state(state)), self.bundle.state_bytes(
                token_ids_B.shape[0]))
        stepper = state.stepper
        if self.stream is None:
            return torch.from_numpy(stepper.step(token_ids_B.numpy())), state
        # On the GPU, in stream order and without a host sync: the token (made on the current stream) into the
        # runtime's input buffer, the step, then the current stream waits for it. The logits stay where ONNX
        # Runtime wrote them: a view of its buffer, valid until the next step.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            state.input_ids.copy_(token_ids_B)
            if stepper.positions is not None:
                state.position_ids.copy_(torch.from_numpy(stepper.positions), non_blocking=True)
        stepper.advance(None)
        current.wait_stream(self.stream)
        return state.logits, state

    def _onnx_state(self, state) -> dict:
        """A torch prefill state in the bundle's input names and layouts (numpy)."""
        from ..export.onnx_io import to_onnx_layout
        from ..state import StepState

        step_state = StepState.from_inference(state, capacity=self.capacity if self.bundle.max_length else None)
        names = (["position_ids"] if self.bundle.has_positions else []) + [p["input"] for p in self.bundle.state]
        flat = to_onnx_layout(step_state, self.bundle.manifest["ops"])
        return {name: t.detach().cpu().numpy() for name, t in zip(names, flat, strict=True)}

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self) -> None:
        self.close()


class OnnxState:
    """The runtime's stepper (its state lives in its buffers), the state's size, and on CUDA torch views of the
    stepper's input and logits buffers."""

    def __init__(self, stepper, nbytes: int) -> None:
        self.stepper = stepper
        self.nbytes = nbytes
        if stepper.bundle.device_type == "cuda":
            self.input_ids, self.logits = _view(stepper.input_ids), _view(stepper.logits)
            self.position_ids = _view(stepper.position_ids) if stepper.position_ids is not None else None


def _view(value) -> torch.Tensor:
    """A torch tensor over an ONNX Runtime OrtValue's memory (no copy)."""
    return torch.from_dlpack(value._get_c_value().to_dlpack())
