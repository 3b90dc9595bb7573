"""`momctl info`: what a checkpoint holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..info import describe_checkpoint


def info(
    checkpoint: Annotated[str, typer.Argument(help="A run folder (its latest checkpoint) or a checkpoint folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Config, parameter counts (total and active per token), state size, tokenizer, step and loss."""
    d = describe_checkpoint(checkpoint)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    table = Table(show_header=False)
    m = d["model"]
    rows = [
        ("checkpoint", d["checkpoint"]), ("step", str(d["step"])),
        ("train / val loss", f"{_num(d['train_loss'])} / {_num(d['val_loss'])}"),
        ("parameters", f"{d['parameters'] / 1e6:.2f}M total, {d['active_parameters_per_token'] / 1e6:.2f}M active "
                       "per token"),
        ("model", f"D={m['d_model']} layers={m['num_layers']} H={m['num_heads']} K={m['head_dim']} "
                  f"E={m['num_memories']} top-{m['top_k']} shared={m['shared_memory']} rule={m['update_rule']} "
                  f"conv={m['conv_scope']} attention layers={m['attention_layers'] or '-'}"),
        ("state per sequence", f"{d['state_bytes_per_sequence'] / 2**20:.3f} MiB fixed"
         + (f" + {d['kv_cache_bytes_per_token']} B per token of KV cache" if d["kv_cache_bytes_per_token"] else "")),
        ("tokenizer", f"{d['tokenizer'].get('kind', '?')} ({d['tokenizer'].get('vocab_size', '?')} ids)"),
        ("data", f"{d['data']['source']} (seq_len {d['data']['seq_len']})"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
