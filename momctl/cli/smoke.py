"""`momctl smoke`: build a preset with random weights and run it forward and by recurrent decode."""

import dataclasses
import json
from typing import Annotated

import typer
from rich.console import Console

from ..devices import resolve_device
from ..presets import get_preset
from ..smoke import run_smoke
from .options import Device, Json, Preset, Seed


def smoke(
    preset: Preset = "tiny",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences.")] = 2,
    seq_len: Annotated[int, typer.Option("--seq-len", "-t", help="Tokens per sequence.")] = 64,
    device: Device = "auto",
    seed: Seed = 0,
    as_json: Json = False,
) -> None:
    """Run a model both ways on random tokens and check that recurrent decode equals the parallel forward."""
    report = run_smoke(get_preset(preset), batch_size, seq_len, resolve_device(device), seed)
    if as_json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return
    out = Console()
    out.print(f"preset {preset}: {report.parameters / 1e6:.2f}M parameters on {report.device}")
    out.print(f"forward   {report.forward_tokens_per_s:12,.0f} tokens/s  ({report.batch_size} x {report.seq_len})")
    out.print(f"decode    {report.decode_tokens_per_s:12,.0f} tokens/s  (prefill 1 token, then step)")
    out.print(f"state     {report.state_bytes_per_sequence / 2**20:12.3f} MiB per sequence, whatever the length")
    out.print(f"decode vs forward: relative error {report.max_rel_error:.2e}")
