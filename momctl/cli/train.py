"""`momctl train`: train a preset (or a config file) on the built-in corpus, your data or MQAR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..run_config import build_run_config
from ..training import train as run_training

err = Console(stderr=True, soft_wrap=True)


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text)


def train(
    preset: Annotated[str, _opt("Model preset (see `momctl presets`).", "--preset", "-p")] = "tiny",
    config: Annotated[Path | None, _opt("YAML or JSON file with model/optim/data/train sections.", "--config")] = None,
    overrides: Annotated[list[str] | None, _opt("Override a setting: --set model.top_k=1 (repeatable).",
                                                 "--set")] = None,
    data: Annotated[str | None, _opt("builtin:python-docs|python-code|all, mqar[:k=v,..], or a path.",
                                     "--data")] = None,
    text_field: Annotated[str | None, _opt("Text field of .jsonl / column of .parquet data.", "--text-field")] = None,
    tokenizer: Annotated[str | None, _opt("A local tokenizer.json (default: byte-level).", "--tokenizer")] = None,
    steps: Annotated[int | None, _opt("Optimiser steps.", "--steps")] = None,
    max_tokens: Annotated[int | None, _opt("Train on this many tokens (sets the steps).", "--max-tokens")] = None,
    seq_len: Annotated[int | None, _opt("Tokens per training sequence.", "--seq-len")] = None,
    batch_size: Annotated[int | None, _opt("Global batch in sequences per step.", "--batch-size")] = None,
    grad_accum: Annotated[int | None, _opt("Micro-steps per optimiser step.", "--grad-accum")] = None,
    lr: Annotated[float | None, _opt("Peak learning rate.", "--lr")] = None,
    out: Annotated[Path | None, _opt("Run folder (default runs/<preset>).", "--out")] = None,
    seed: Annotated[int | None, _opt("Random seed.", "--seed")] = None,
    device: Annotated[str | None, _opt("auto, cpu, cuda or cuda:N.", "--device")] = None,
    dtype: Annotated[str | None, _opt("auto (bf16 on GPU), float32, bfloat16, float16.", "--dtype")] = None,
    compile_model: Annotated[bool, _opt("torch.compile the model.", "--compile")] = False,
    resume: Annotated[str | None, _opt("auto (latest checkpoint in --out) or a checkpoint/run folder.",
                                       "--resume")] = None,
    init_from: Annotated[str | None, _opt("Start from these weights (fresh optimiser).", "--init-from")] = None,
    eval_every: Annotated[int | None, _opt("Validate every N steps.", "--eval-every")] = None,
    save_every: Annotated[int | None, _opt("Checkpoint every N steps.", "--save-every")] = None,
    keep_last: Annotated[int | None, _opt("Keep the last N checkpoints.", "--keep-last")] = None,
    on_nan: Annotated[str | None, _opt("stop (default) or skip steps with a NaN/inf loss.", "--on-nan")] = None,
    nproc: Annotated[int, _opt("Processes (re-launches itself under torchrun).", "--nproc")] = 1,
) -> None:
    """Train a MoM model (or a baseline). With no arguments: the tiny preset on the built-in corpus, on this CPU."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch_under_torchrun(nproc))
    flags: dict[str, Any] = {
        "data.source": data, "data.text_field": text_field, "data.tokenizer": tokenizer, "data.seq_len": seq_len,
        "train.steps": steps, "train.max_tokens": max_tokens, "train.batch_size": batch_size,
        "train.grad_accum": grad_accum, "optim.lr": lr, "train.seed": seed, "train.device": device,
        "train.dtype": dtype, "train.compile": compile_model or None, "train.eval_every": eval_every,
        "train.save_every": save_every, "train.keep_last": keep_last, "train.on_nan": on_nan,
    }
    run, explicit = build_run_config(preset, config, flags, overrides)
    out = out or Path("runs") / run.preset
    reporter = RichReporter()
    try:
        result = run_training(run, out, explicit=explicit, resume=resume, init_from=init_from, reporter=reporter)
    finally:
        reporter.close()
    if int(os.environ.get("RANK", "0")) == 0 and result.checkpoint is not None:
        err.print(f"checkpoint: {result.checkpoint}")
        if result.stopped_early:
            print(f"stopped early; continue with: momctl train --resume auto --out {out}")
        else:
            print(f"next: momctl generate {out}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker()


def _exit_worker() -> None:
    """End a torchrun worker without interpreter teardown.

    DistributedDataParallel keeps references to the gloo/NCCL process group that outlive `destroy_process_group`
    (torch 2.13), so its C++ threads are still running when the interpreter finalises, and one of them sometimes
    aborts the process ("terminate called without an active exception") after training finished and saved.
    Everything is written by now; flush and leave.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _relaunch_under_torchrun(nproc: int) -> int:
    args = sys.argv[1:]
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            cleaned.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "momctl", *cleaned]
    return subprocess.call(command)


class RichReporter:
    """A progress bar on stderr with one log line per interval printed above it (rank 0 only)."""

    def __init__(self) -> None:
        self.main = int(os.environ.get("RANK", "0")) == 0
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if not self.main:
            return
        if event == "start":
            err.print(f"training {info['parameters'] / 1e6:.2f}M parameters on {info['device']} ({info['dtype']}, "
                      f"{info['world_size']} process(es)) into {info['run_dir']}")
            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=err,
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"],
                                               loss="-")
        elif event == "step" and self.progress is not None:
            self.progress.update(self.task, completed=info["step"], loss=f"{info['loss']:.3f}")
        elif event == "log":
            (self.progress.console if self.progress else err).print(info["line"], highlight=False)
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
