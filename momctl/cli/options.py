"""Option aliases shared by the commands (names mirror config fields)."""

from typing import Annotated

import typer

Preset = Annotated[str, typer.Option("--preset", "-p", help="Model preset (see `momctl presets`).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]
