"""`momctl export onnx`: the static step as an ONNX graph, in a bundle folder that runs without torch.

The bundle holds `model.onnx` (with `model.onnx.data` beside it when the weights pass EXTERNAL_DATA_BYTES), the
tokenizer files and `manifest.json` (inputs, outputs, which output feeds which input, the config). The export checks
itself: it runs fed-back steps in ONNX Runtime (CPU) against PyTorch and fails if the logits differ.

The graph comes from torch.onnx.export's torch.export-based exporter (opset 18 and up; the TorchScript exporter is
deprecated). fp32 graphs are for CPUs; fp16 graphs (fp32 norms, decay parameters and state, but fp16 conv windows on
`onnxruntime-cuda`) are for GPUs. MoM layers step on ONNX Runtime's fused recurrent ops by default (`--ops
onnxruntime`: `ort_ops.py`, a few nodes a layer), on them with the recurrence on its CUDA-only GatedDeltaNet (`--ops
onnxruntime-cuda`: fewer nodes, verified on the CUDA provider), or on standard ONNX ops only (`--ops standard`: about
a hundred nodes a layer, for runtimes other than ONNX Runtime).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MomctlError
from ..generation import load_for_inference
from ..modules import RMSNorm
from ..state import StepState
from ..state_file import config_sha256
from ..tokenizers import describe_tokenizer, save_tokenizer
from . import BUNDLE_FORMAT, DEFAULT_MAX_LENGTH
from .onnx_io import OnnxStep, io_specs, state_specs, to_onnx_layout
from .ort_ops import TRANSLATIONS
from .runtime import ORT_TYPES, load_error
from .step_weights import pack_for_decoding

VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
OPSETS = range(18, 24)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
OPS = ("onnxruntime", "onnxruntime-cuda", "standard")
# Largest relative error ||onnx - torch|| / ||torch|| of any step's logits that the export accepts.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)
EXAMPLE_BATCH = 2
# The largest batch torch.export traces the graph for (the ONNX batch axis itself is unbounded).
MAX_TRACED_BATCH = 4096


@dataclass
class ExportReport:
    folder: Path
    dtype: str
    opset: int
    ops: str
    model_bytes: int  # model.onnx (+ its external data)
    verify_steps: int
    max_rel_error: float
    seconds: float


def export_onnx(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", opset: int = 18,
                max_length: int = DEFAULT_MAX_LENGTH, verify_steps: int = 16, ops: str = "onnxruntime") -> ExportReport:
    """Export a checkpoint's static step to an ONNX bundle folder `out` (new or empty; written whole or not at all).

    Args:
        checkpoint: a run folder (its latest checkpoint) or a checkpoint folder.
        out: the bundle folder.
        dtype: `fp32` (CPU) or `fp16` (CUDA; the memories stay fp32, and so do the conv windows except with
            `onnxruntime-cuda`).
        opset: ONNX opset, 18 to 23.
        max_length: KV-cache positions of attention layers (prompt + generated tokens); unused without them.
        verify_steps: fed-back steps compared with PyTorch in ONNX Runtime (CPU) before the bundle is kept.
        ops: `onnxruntime` (MoM layers on ONNX Runtime's fused `com.microsoft` ops), `onnxruntime-cuda` (the same
            with the recurrence on its CUDA-only GatedDeltaNet; needs onnxruntime-gpu and a GPU) or `standard` (ONNX
            ops only).
    """
    _check_options(dtype, opset, max_length, verify_steps, ops)
    _check_out(Path(out))
    loaded = load_for_inference(checkpoint, torch.device("cpu"))
    return export_bundle(loaded.model, loaded.tokenizer, out, dtype=dtype, opset=opset, max_length=max_length,
                         verify_steps=verify_steps, source=str(loaded.checkpoint), ops=ops)


def export_bundle(model: torch.nn.Module, tokenizer, out: str | Path, *, dtype: str = "fp32", opset: int = 18,
                  max_length: int = DEFAULT_MAX_LENGTH, verify_steps: int = 16,
                  source: str | None = None, ops: str = "onnxruntime") -> ExportReport:
    """Export a `MoMForCausalLM` (on the CPU) and its tokenizer as a bundle; arguments as in `export_onnx`
    (`source`: where the weights came from, for the manifest). The model is not changed."""
    start = time.perf_counter()
    _check_options(dtype, opset, max_length, verify_steps, ops)
    provider = verification_provider(ops)
    out = Path(out)
    _check_out(out)
    model = _cast(copy.deepcopy(model), DTYPES[dtype])
    pack_for_decoding(model)  # the graph runs one matmul per layer's input projections
    config = model.config
    capacity = max_length if config.attention_layers else 0
    if not config.attention_layers and max_length != DEFAULT_MAX_LENGTH:
        warnings.warn(f"--max-length {max_length} has no effect: the model has no attention layers, and its state "
                      f"does not grow with the length", stacklevel=2)
    inputs, outputs = io_specs(config, capacity, ops, dtype)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise MomctlError(f"cannot create the bundle folder beside {out} ({err.strerror}); pass a writable --out") \
            from None
    try:
        model_bytes = _export_graph(model, tmp / MODEL_FILE, inputs, outputs, capacity, opset, ops)
        max_err = verify(tmp / MODEL_FILE, model, capacity, verify_steps, TOLERANCE[dtype], ops, provider)
        save_tokenizer(tokenizer, tmp)
        manifest = {
            "format": BUNDLE_FORMAT, "version": VERSION, "model": MODEL_FILE, "dtype": dtype, "opset": opset,
            "ops": ops, "max_length": capacity or None, "config": config.to_dict(),
            "config_sha256": config_sha256(config), "source": source, "tokenizer": describe_tokenizer(tokenizer),
            "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs],
            "state": [{"input": s.past, "output": s.present} for s in state_specs(config, capacity, ops, dtype)],
            "verification": {"steps": verify_steps, "provider": provider, "max_rel_error": max_err,
                             "tolerance": TOLERANCE[dtype]},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out, dtype, opset, ops, model_bytes, verify_steps, max_err, time.perf_counter() - start)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MomctlError(f"--out {out} exists and is not an empty folder: pass a new folder (the export never "
                          f"overwrites)")


def _check_options(dtype: str, opset: int, max_length: int, verify_steps: int, ops: str) -> None:
    if dtype not in DTYPES:
        raise MomctlError(f"--dtype {dtype} is not supported; use fp32 (CPU) or fp16 (CUDA)")
    if ops not in OPS:
        raise MomctlError(f"--ops {ops} is not supported; use onnxruntime (ONNX Runtime's fused recurrent ops), "
                          f"onnxruntime-cuda (the same on its CUDA-only GatedDeltaNet) or standard (standard ONNX ops "
                          f"only)")
    if opset not in OPSETS:
        raise MomctlError(f"--opset {opset} is not supported; use {OPSETS[0]} to {OPSETS[-1]} (the exporter writes "
                          f"opset {OPSETS[0]} and up)")
    if max_length < 1:
        raise MomctlError(f"--max-length {max_length} must be at least 1")
    if verify_steps < 1:
        raise MomctlError(f"--verify-steps {verify_steps} must be at least 1: every export is checked")


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model in `dtype`, except norm weights and decay parameters, which stay fp32."""
    model = model.to(dtype)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.float()
        for name in ("A_log", "dt_bias"):
            if isinstance(getattr(module, name, None), torch.nn.Parameter):
                getattr(module, name).data = getattr(module, name).data.float()
    return model.eval()


def _export_graph(model, path: Path, inputs, outputs, capacity: int, opset: int, ops: str) -> int:
    """Write the graph to `path` (weights as external data past EXTERNAL_DATA_BYTES). Returns its bytes."""
    state = StepState.from_inference(model.init_state(EXAMPLE_BATCH), capacity=capacity or None)
    past = to_onnx_layout(state, ops)  # inputs after input_ids: in their specs' dtypes
    args = (torch.zeros(EXAMPLE_BATCH, dtype=torch.long),
            *(t.to(getattr(torch, spec.dtype)) for t, spec in zip(past, inputs[1:], strict=True)))
    batch = torch.export.Dim("batch", min=1, max=MAX_TRACED_BATCH)
    dynamic_shapes = ({0: batch}, tuple({0: batch} for _ in args[1:]))
    # The exporter logs that torchvision is absent (its ops are not needed here) and warns about its own internals.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(OnnxStep(model, ops).eval(), args, dynamo=True, opset_version=opset,
                                    input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=TRANSLATIONS,
                                    verbose=False)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    written = _opset_of(path)
    if written != opset:
        raise MomctlError(f"the exporter wrote opset {written}, not the requested {opset}: pass --opset {written}")
    return sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*"))


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def verification_provider(ops: str) -> str:
    """The ONNX Runtime execution provider the export verifies a graph on `ops` with: the CPU's, or CUDA's for
    `onnxruntime-cuda` (MomctlError when this ONNX Runtime or machine has none)."""
    if ops != "onnxruntime-cuda":
        return "CPUExecutionProvider"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        raise MomctlError("--ops onnxruntime-cuda graphs run only on ONNX Runtime's CUDA provider (GatedDeltaNet has "
                          "no CPU kernel), which the export needs to verify the graph: export on a machine with an "
                          "NVIDIA GPU and onnxruntime-gpu, or use --ops onnxruntime")
    return "CUDAExecutionProvider"


def verify(path: Path, model: torch.nn.Module, capacity: int, steps: int, tolerance: float, ops: str,
           provider: str = "CPUExecutionProvider") -> float:
    """Run `steps` fed-back steps of the graph at `path` in ONNX Runtime (on `provider`) and of `decode_step` in
    PyTorch from an empty state, on the same random tokens (batch EXAMPLE_BATCH + 1, not the traced batch);
    MomctlError when any step's logits differ by more than `tolerance` (relative). Returns the largest relative
    error."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=[provider])
    except Exception as err:  # ONNX Runtime's own exception types
        raise load_error(path, err, ops) from None
    if provider not in session.get_providers():
        raise MomctlError(f"ONNX Runtime could not start its {provider} to verify the export (CUDA or cuDNN libraries "
                          f"missing?); install onnxruntime-gpu with its CUDA libraries, or use --ops onnxruntime")
    B = EXAMPLE_BATCH + 1
    c = model.config
    tokens = torch.randint(0, c.vocab_size, (steps, B), generator=torch.Generator().manual_seed(0))
    state = StepState.from_inference(model.init_state(B), capacity=capacity or None)
    names = [i.name for i in session.get_inputs()]
    past = [t.numpy().astype(ORT_TYPES[i.type]) for t, i in zip(to_onnx_layout(state, ops), session.get_inputs()[1:],
                                                                 strict=True)]
    worst = 0.0
    for t in range(steps):
        with torch.no_grad():
            want, state = model.step(tokens[t], state)
        got, *present = session.run(None, dict(zip(names, [tokens[t].numpy(), *past], strict=True)))
        want = want.float().numpy()
        error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
        worst = max(worst, error if np.isfinite(error) else float("inf"))
        if not worst <= tolerance:
            raise MomctlError(f"the exported graph's logits differ from PyTorch's at step {t + 1} (relative error "
                              f"{error:.2e} > {tolerance:.0e}): the export is wrong; report it with the checkpoint")
        past = ([past[0] + 1] if c.attention_layers else []) + present
    return worst
