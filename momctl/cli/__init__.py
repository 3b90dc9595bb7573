"""The `momctl` command line: thin Typer commands over the library. `main()` turns user errors into one red line."""

from __future__ import annotations

import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import MomctlError
from . import bench, data, export, generate, info, presets, smoke, train

app = typer.Typer(name="momctl", help="Train, run, measure and ship Mixture-of-Memories language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("train")(train.train)
app.command("generate")(generate.generate_command)
app.command("info")(info.info)
app.add_typer(data.app, name="data")
app.add_typer(export.app, name="export")
app.command("presets")(presets.presets)
app.command("smoke")(smoke.smoke)
app.command("bench")(bench.bench)

err_console = Console(stderr=True)


def main() -> None:
    """Entry point: usage errors exit 2 (Typer); user errors (MomctlError, ValueError) print one red line and exit 1.

    MOMCTL_DEBUG=1 shows the traceback instead.
    """
    warnings.showwarning = _show_warning
    try:
        app()
    except (MomctlError, ValueError) as err:
        if os.environ.get("MOMCTL_DEBUG") == "1":
            raise
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a setting with no effect, a skipped partial checkpoint) as one yellow line on stderr."""
    err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
