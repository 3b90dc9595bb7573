"""The sweep: every model x mode x length x batch, one cell at a time, into one JSON-ready document.

A cell that runs out of GPU memory is marked `oom` and the sweep goes on; a model that cannot run here (FLA not
installed, no GPU, no such layer) has its cells `skipped` with the reason; any other failure is an `error` cell
with its message (or raised, with `raise_errors`). Nothing in the document is estimated: every time and memory
figure was measured in this run; state sizes are computed from the configs and say so.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import MomctlError
from .backends import check_backend
from .environment import environment
from .models import Subject, Unavailable, build_subject, model_configs
from .modes import measure
from .settings import STATE_MODES, BenchSettings
from .state_size import crossover_tokens, state_layout

SCHEMA = "momctl-bench/1"
STATUSES = ("ok", "oom", "skipped", "error")
# Every cell carries every field; None where a field does not apply or was not measured.
CELL_FIELDS = ("mode", "model", "seq_len", "batch_size", "status", "reason", "median_ms", "p20_ms", "p80_ms",
               "repeats", "warmup_s", "tokens_per_s", "speedup", "tflops_per_s", "gb_per_s", "peak_bytes",
               "base_bytes", "state_bytes_per_sequence")


def new_document(settings: BenchSettings, base: ModelConfig, source: str, command: str | None = None) -> dict:
    """The JSON document before any cell: settings, configs, environment and the computed state sizes."""
    configs = model_configs(base)
    layouts = {name: state_layout(configs[name], settings.torch_dtype) for name in ("mom", "gdn", "transformer",
                                                                                   "hybrid")}
    return {
        "schema": SCHEMA,
        "command": command,
        "complete": False,
        "config_source": source,
        "settings": settings.to_dict(),
        "environment": environment(torch.device(settings.device)),
        "configs": {name: configs[name].to_dict() for name in settings.models},
        "state": {"computed": True, "dtype": settings.dtype, "per_sequence": layouts,
                  "crossover_tokens": crossover_tokens(layouts["mom"], layouts["transformer"])},
        "results": [],
    }


def run_bench(settings: BenchSettings, base: ModelConfig, source: str, *, command: str | None = None,
              on_cell: Callable[[dict, dict], None] | None = None, raise_errors: bool = False) -> dict:
    """Measure every cell of `settings` for the models derived from `base`. `on_cell(cell, document)` is called
    after each cell (to print progress and save partial results). Returns the complete document."""
    device = torch.device(settings.device)
    if any(m in STATE_MODES for m in settings.modes):
        check_backend(settings.backend)
    if device.type == "cuda":
        if device.index is None:  # "cuda" means the current GPU; set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    doc = new_document(settings, base, source, command)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for name in settings.models:
            _run_model(name, settings, base, device, doc, on_cell, raise_errors)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    add_speedups(doc)
    doc["complete"] = True
    return doc


def _run_model(name, settings, base, device, doc, on_cell, raise_errors) -> None:
    subject: Subject | None = None
    failure: dict[str, Any] = {}
    try:
        subject = build_subject(name, base, settings.scope, device, settings.torch_dtype, settings.seed)
    except Unavailable as why:
        failure = {"status": "skipped", "reason": str(why)}
    except torch.cuda.OutOfMemoryError:
        failure = {"status": "oom", "reason": "out of memory while building the model"}
    except MomctlError:
        raise
    except Exception as err:
        if raise_errors:
            raise
        failure = {"status": "error", "reason": f"building the model: {_one_line(err)}"}
    release_memory(device)
    for mode in settings.modes:
        for seq_len in settings.seq_lens:
            for batch in settings.batches(mode, seq_len):
                cell = dict.fromkeys(CELL_FIELDS)
                cell.update(mode=mode, model=name, seq_len=seq_len, batch_size=batch)
                cell.update(failure or run_cell(subject, mode, seq_len, batch, settings, device, raise_errors))
                doc["results"].append(cell)
                if on_cell is not None:
                    on_cell(cell, doc)
    del subject
    release_memory(device)


def run_cell(subject: Subject, mode: str, seq_len: int, batch: int, settings: BenchSettings,
             device: torch.device, raise_errors: bool = False) -> dict:
    """One cell's fields: `status` ok with the measurements, or oom / skipped / error with a `reason`."""
    note = None
    if subject.is_reference and mode in STATE_MODES and settings.backend != "eager":
        # FLA's decode cannot be compiled or exported: time it eagerly, side by side with ours, and say so.
        settings, note = replace(settings, backend="eager"), "the reference decodes eagerly only: eager backend"
    result: dict[str, Any] = {"status": "oom", "reason": "out of memory"}
    try:
        result = {"status": "ok", "reason": note, **measure(subject, mode, seq_len, batch, settings, device)}
    except torch.cuda.OutOfMemoryError:
        pass  # handled below, after the exception (and the tensors its frames hold) is gone
    except Unavailable as why:
        result = {"status": "skipped", "reason": str(why)}
    except MomctlError:
        raise
    except Exception as err:
        if raise_errors:
            raise
        result = {"status": "error", "reason": _one_line(err)}
    release_memory(device)
    return result


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(doc: dict) -> None:
    """`speedup` of each measured cell: its tokens/s over the baseline's in the same mode, length and batch."""
    baseline = doc["settings"]["baseline"]
    reference = {(c["mode"], c["seq_len"], c["batch_size"]): c["tokens_per_s"] for c in doc["results"]
                 if c["model"] == baseline and c["status"] == "ok"}
    for cell in doc["results"]:
        base = reference.get((cell["mode"], cell["seq_len"], cell["batch_size"]))
        cell["speedup"] = cell["tokens_per_s"] / base if cell["status"] == "ok" and base else None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
