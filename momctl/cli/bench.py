"""`momctl bench`: throughput and memory of MoM against its baselines, as tables, JSON and a plot."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..bench import resolve_settings, run_bench
from ..bench.plot import plot_document, require_matplotlib
from ..bench.report import document_json, progress_line, render, write_json
from ..bench.settings import DEFAULTS
from ..devices import resolve_device
from ..errors import MomctlError
from ..presets import get_preset
from ..run_config import build_run_config
from .options import Device, Seed

err = Console(stderr=True, soft_wrap=True)


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text)


def bench(
    seq_len: Annotated[str | None, _opt("Comma list of sequence / context / prompt lengths (default: 1024..8192 on "
                                        "a GPU, 64..256 on a CPU).", "--seq-len")] = None,
    mode: Annotated[str, _opt("Comma list of train, prefill, decode, generate.", "--mode")] = "train",
    models: Annotated[str | None, _opt("Comma list of mom, gdn, transformer, hybrid, reference, reference-gdn "
                                       "(default: mom,gdn,transformer,reference).", "--models")] = None,
    preset: Annotated[str | None, _opt("Base preset (default: mom-340m on a GPU, tiny on a CPU).",
                                       "--preset", "-p")] = None,
    config: Annotated[Path | None, _opt("A run config file (YAML/JSON with a model section) on top of the preset.",
                                        "--config")] = None,
    scope: Annotated[bool | None, _opt("One mixer layer or the whole causal LM (default: --layer for "
                                       "train/prefill, --model with decode/generate).", "--layer/--model")] = None,
    batch_tokens: Annotated[int | None, _opt("Tokens per train/prefill batch: batch = tokens // seq_len (default "
                                             "32768 on a GPU, 1024 on a CPU).", "--batch-tokens")] = None,
    batch_size: Annotated[str | None, _opt("Comma list of batch sizes (default: from --batch-tokens in "
                                           "train/prefill; 1,16 (GPU) or 1,4 (CPU) in decode; 1 in generate).",
                                           "--batch-size")] = None,
    new_tokens: Annotated[int | None, _opt("Tokens to generate per prompt in --mode generate (default 128 on a "
                                           "GPU, 32 on a CPU).", "--new-tokens")] = None,
    dtype: Annotated[str, _opt("auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16, float16.",
                               "--dtype")] = "auto",
    device: Device = "auto",
    backend: Annotated[str, _opt("Decoding step of decode/generate: eager, compile, onnx (ONNX Runtime's fused "
                                 "ops), onnx-cuda (the same on its CUDA-only GatedDeltaNet), onnx-standard "
                                 "(standard ONNX ops).", "--backend")] = "eager",
    baseline: Annotated[str | None, _opt("Model the speed-ups are relative to (default: transformer).",
                                         "--baseline")] = None,
    repeats: Annotated[int | None, _opt("Timed calls per cell (default 10 on a GPU, 3 on a CPU).",
                                        "--repeats")] = None,
    profile: Annotated[bool, _opt("Add a GPU time breakdown by kernel class to train/prefill cells.",
                                  "--profile")] = False,
    seed: Seed = 0,
    json_out: Annotated[str | None, _opt("Write the JSON document to FILE, or '-' for the last line of stdout.",
                                         "--json")] = None,
    plot: Annotated[Path | None, _opt("Write a PNG of tokens/s and memory against length (needs matplotlib).",
                                      "--plot")] = None,
) -> None:
    """Measure throughput, latency and memory of MoM, its baselines and the reference over sequence lengths."""
    torch_device = resolve_device(device)
    settings = resolve_settings(device=torch_device, modes=mode, models=models, seq_lens=seq_len,
                                scope=None if scope is None else "layer" if scope else "model",
                                batch_tokens=batch_tokens, batch_sizes=batch_size, dtype=dtype, repeats=repeats,
                                new_tokens=new_tokens, backend=backend, baseline=baseline, profile=profile, seed=seed)
    preset = preset or DEFAULTS["cuda" if torch_device.type == "cuda" else "cpu"]["preset"]
    if config is not None:
        run, _ = build_run_config(preset, config)
        base, source = run.model, f"config {config}"
    else:
        base, source = get_preset(preset), f"preset {preset}"
    json_path = Path(json_out) if json_out not in (None, "-") else None
    for option, path in (("--json", json_path), ("--plot", plot)):
        if path is not None and not path.parent.is_dir():
            raise MomctlError(f"{option} {path}: folder {path.parent} does not exist; create it or pick another path")
    if plot is not None:
        require_matplotlib()

    def on_cell(cell: dict, doc: dict) -> None:
        err.print(progress_line(cell), highlight=False, markup=False)
        if json_path is not None:  # after every cell, so a run cut short keeps what it measured
            write_json(doc, json_path)

    err.print(f"bench {','.join(settings.modes)} ({settings.scope}) of {','.join(settings.models)} on "
              f"{torch_device}, {source}, {settings.dtype}", highlight=False, markup=False)
    doc = run_bench(settings, base, source, command=shlex.join(["momctl", *sys.argv[1:]]), on_cell=on_cell,
                    raise_errors=os.environ.get("MOMCTL_DEBUG") == "1")
    # Tables keep their columns when stdout is a file or a pipe (Rich would assume 80 columns).
    render(doc, Console() if sys.stdout.isatty() else Console(width=160))
    if json_path is not None:
        write_json(doc, json_path)
    if plot is not None:
        plot_document(doc, plot)
        err.print(f"plot: {plot}", highlight=False)
    if json_out == "-":
        sys.stdout.write(document_json(doc, indent=None) + "\n")
        sys.stdout.flush()
    failed = [c for c in doc["results"] if c["status"] == "error"]
    if failed:
        c = failed[0]
        raise MomctlError(f"{len(failed)} of {len(doc['results'])} cells failed; first: {c['model']} {c['mode']} "
                          f"T={c['seq_len']} B={c['batch_size']}: {c['reason']}")
