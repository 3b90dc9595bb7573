"""`momctl export onnx`: write a checkpoint's decoding step as an ONNX bundle that runs without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..export import DEFAULT_MAX_LENGTH

app = typer.Typer(help="Export a model for other runtimes.", no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)


@app.command("onnx")
def onnx(
    checkpoint: Annotated[str, typer.Argument(help="A run folder (its latest checkpoint) or a checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", help="The bundle folder to write (new or empty).")],
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 (CPU) or fp16 (CUDA; fp32 memories, and fp32 conv "
                                                       "windows except with --ops onnxruntime-cuda).")] = "fp32",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 18 to 23.")] = 18,
    max_length: Annotated[int, typer.Option("--max-length", help="KV-cache positions of attention layers "
                                                                 "(prompt + generated tokens).")] = DEFAULT_MAX_LENGTH,
    verify_steps: Annotated[int, typer.Option("--verify-steps", help="Fed-back steps checked against PyTorch "
                                                                     "in ONNX Runtime.")] = 16,
    ops: Annotated[str, typer.Option("--ops", help="onnxruntime: MoM layers on ONNX Runtime's fused recurrent ops "
                                                   "(fast); onnxruntime-cuda: the same on its CUDA-only GatedDeltaNet "
                                                   "(fastest on NVIDIA GPUs; exports and runs on CUDA only); "
                                                   "standard: standard ONNX ops only (any runtime).")]
    = "onnxruntime",
) -> None:
    """Export the static decoding step (one token per sequence, state in and out) to OUT/model.onnx."""
    from ..export.onnx_export import export_onnx  # imported here: onnx and onnxscript slow every other command

    report = export_onnx(checkpoint, out, dtype=dtype, opset=opset, max_length=max_length, verify_steps=verify_steps,
                         ops=ops)
    err.print(f"exported {report.dtype} opset {report.opset}, {report.ops} ops ({report.model_bytes / 2**20:.1f} "
              f"MiB) in "
              f"{report.seconds:.1f} s; ONNX Runtime matches PyTorch over {report.verify_steps} steps (max relative "
              f"error {report.max_rel_error:.1e})", highlight=False)
    print(report.folder)
