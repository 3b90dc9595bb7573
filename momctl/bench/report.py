"""Rendering a benchmark document: one Rich table per mode, notes, the state crossover line, and JSON output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .state_size import state_bytes

TIME_HEADERS = {"train": "ms / step", "prefill": "ms", "decode": "ms / token", "generate": "total ms"}
LENGTH_HEADERS = {"train": "T", "prefill": "T", "decode": "context", "generate": "prompt"}


def render(doc: dict, console: Console) -> None:
    """Print the tables, the reasons of skipped / failed cells, and the state sizes with their crossover."""
    s = doc["settings"]
    env = doc["environment"]
    where = env["gpu"] or f"CPU ({env['cpu_count']} cores)"
    console.print(f"momctl bench: {s['scope']} scope, {doc['config_source']}, {s['dtype']}, {where}; driver "
                  f"{env['driver'] or '-'}, torch {env['torch']}, triton {env['triton'] or '-'}, FLA "
                  f"{env['fla'] or '-'}, commit {env['commit'] or '-'}", highlight=False, markup=False)
    for mode in s["modes"]:
        cells = [c for c in doc["results"] if c["mode"] == mode]
        if cells:
            console.print(mode_table(doc, mode, cells))
    for line in notes(doc):
        console.print(line, highlight=False, markup=False)


def mode_table(doc: dict, mode: str, cells: list[dict]) -> Table:
    s = doc["settings"]
    title = f"{mode} ({s['scope']}), median of {s['repeats']} (p20-p80)"
    if mode in ("decode", "generate"):
        title += f", {s['backend']} step" + (f", {s['new_tokens']} new tokens" if mode == "generate" else "")
    table = Table(title=title, title_justify="left")
    with_state = s["scope"] == "model"
    table.add_column("model")
    for header in (LENGTH_HEADERS[mode], "batch"):
        table.add_column(header, justify="right")
    table.add_column(TIME_HEADERS[mode], justify="right")
    table.add_column("p20-p80", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column(f"vs {s['baseline']}", justify="right")
    if mode in ("train", "prefill"):
        table.add_column("TFLOP/s", justify="right")
    if mode == "decode":
        table.add_column("GB/s", justify="right")
    table.add_column("peak GiB", justify="right")
    if with_state:
        table.add_column("state / seq", justify="right")
    table.add_column("warm-up s", justify="right")
    order = {name: i for i, name in enumerate(s["models"])}
    shown = sorted((c for c in cells if c["status"] != "skipped"),
                   key=lambda c: (c["seq_len"], c["batch_size"], order[c["model"]]))
    previous = None
    for c in shown:
        if previous is not None and c["seq_len"] != previous:
            table.add_section()
        previous = c["seq_len"]
        row = [escape(c["model"]), str(c["seq_len"]), str(c["batch_size"])]
        if c["status"] == "ok":
            row += [_num(c["median_ms"]), f"{_num(c['p20_ms'])}-{_num(c['p80_ms'])}", _rate(c["tokens_per_s"]),
                    f"{c['speedup']:.2f}x" if c["speedup"] is not None else "-"]
            if mode in ("train", "prefill"):
                row.append(_num(c["tflops_per_s"]) if c["tflops_per_s"] is not None else "-")
            if mode == "decode":
                row.append(_num(c["gb_per_s"]) if c["gb_per_s"] is not None else "-")
            row += [_gib(c["peak_bytes"]), *([_state(doc, c)] if with_state else []), f"{c['warmup_s']:.1f}"]
        else:
            row += ["OOM" if c["status"] == "oom" else "error"] + ["-"] * (len(table.columns) - 4)
        table.add_row(*row)
    return table


def notes(doc: dict) -> list[str]:
    """One line per skipped model or failed cell reason, then the state-size summary."""
    lines, seen = [], set()
    for c in doc["results"]:
        if c["status"] in ("skipped", "error") and (c["model"], c["reason"]) not in seen:
            seen.add((c["model"], c["reason"]))
            lines.append(f"{c['model']}: {c['status']} ({c['reason']})")
    state = doc["state"]
    mom, transformer = state["per_sequence"]["mom"], state["per_sequence"]["transformer"]
    crossover = state["crossover_tokens"]
    lines.append(f"state per sequence (computed): mom {_bytes(mom['fixed_bytes'])} at any length; transformer KV "
                 f"cache {_bytes(transformer['bytes_per_token'])} per token ({state['dtype']})"
                 + (f"; MoM's state is the smaller one from {crossover:,} tokens of context" if crossover else ""))
    return lines


def _state(doc: dict, cell: dict) -> str:
    """The state per sequence at this cell's context: measured in decode/generate, else computed from the config."""
    if cell["state_bytes_per_sequence"] is not None:
        return _bytes(cell["state_bytes_per_sequence"])
    layout = doc["state"]["per_sequence"].get(cell["model"])
    if layout is None or cell["mode"] in ("decode", "generate"):
        return "-"
    return _bytes(state_bytes(layout, cell["seq_len"]))


def document_json(doc: dict, indent: int | None = 1) -> str:
    return json.dumps(doc, indent=indent)


def write_json(doc: dict, path: Path) -> None:
    """Write atomically: a run cut short leaves the previous file or a complete partial document, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(document_json(doc) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def progress_line(cell: dict) -> str:
    head = f"{cell['mode']:8s} {cell['model']:13s} T={cell['seq_len']:<6d} B={cell['batch_size']:<4d}"
    if cell["status"] != "ok":
        return f"{head} {cell['status']}" + (f" ({cell['reason']})" if cell["reason"] else "")
    peak = f"  peak {_gib(cell['peak_bytes'])} GiB" if cell["peak_bytes"] is not None else ""
    return (f"{head} {_num(cell['median_ms'])} ms  {_rate(cell['tokens_per_s'])} tokens/s{peak}  warm-up "
            f"{cell['warmup_s']:.1f} s")


def _num(x: float) -> str:
    return f"{x:.3g}" if x < 1 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
