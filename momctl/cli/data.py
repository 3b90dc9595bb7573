"""`momctl data prepare`: tokenise a corpus once into a .bin memmap + JSON sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..data import prepare_bin
from ..tokenizers import load_tokenizer

app = typer.Typer(help="Prepare training data.", no_args_is_help=True)


@app.command("prepare")
def prepare(
    source: Annotated[str, typer.Argument(help="builtin:..., a .txt file or folder, .jsonl or .parquet.")],
    out: Annotated[Path, typer.Option("--out", help="The .bin file to write (a .json sidecar goes beside it).")],
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="A local tokenizer.json (default: bytes).")]
    = None,
    text_field: Annotated[str, typer.Option("--text-field", help="Field / column holding the text.")] = "text",
) -> None:
    """Tokenise SOURCE into OUT (train with `momctl train --data OUT`)."""
    sidecar = prepare_bin(source, out, load_tokenizer(tokenizer), text_field=text_field)
    Console(stderr=True).print(f"wrote {sidecar['num_tokens']:,} tokens to {out}", highlight=False)
