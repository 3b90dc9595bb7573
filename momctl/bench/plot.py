"""A PNG of a benchmark document: tokens/s and peak memory against sequence length, log scales, one line per model
(and batch size). matplotlib is an optional extra, imported only here."""

from __future__ import annotations

from pathlib import Path

from ..errors import MomctlError


def require_matplotlib():
    """The pyplot module with a file-only backend; MomctlError naming the extra when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise MomctlError("--plot needs matplotlib, which is not installed; pip install 'momctl[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_document(doc: dict, path: Path) -> None:
    """One row per mode: tokens/s (left) and peak GPU memory (right) against length. Cells that did not run
    (OOM, skipped, error) are left out of their line."""
    plt = require_matplotlib()
    modes = doc["settings"]["modes"]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    for row, mode in zip(axes, modes, strict=True):
        cells = [c for c in doc["results"] if c["mode"] == mode and c["status"] == "ok"]
        series: dict[str, list[dict]] = {}
        for c in cells:
            label = c["model"] if _single_batch(doc, mode) else f"{c['model']} B={c['batch_size']}"
            series.setdefault(label, []).append(c)
        for label, points in series.items():
            points.sort(key=lambda c: c["seq_len"])
            x = [c["seq_len"] for c in points]
            row[0].plot(x, [c["tokens_per_s"] for c in points], marker="o", label=label)
            memory = [(c["seq_len"], c["peak_bytes"] / 2**30) for c in points if c["peak_bytes"] is not None]
            if memory:
                row[1].plot(*zip(*memory, strict=True), marker="o", label=label)
        length = {"decode": "context length", "generate": "prompt length"}.get(mode, "sequence length")
        for ax, ylabel in ((row[0], "tokens/s"), (row[1], "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{length} (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend()
        if not row[1].get_lines():
            row[1].set_axis_off()
            row[1].text(0.5, 0.5, "peak memory: measured on CUDA only", ha="center", va="center",
                        transform=row[1].transAxes)
    env = doc["environment"]
    fig.suptitle(f"momctl bench ({doc['settings']['scope']}, {doc['config_source']}, {doc['settings']['dtype']}, "
                 f"{env['gpu'] or 'CPU'}, commit {env['commit'] or '-'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _single_batch(doc: dict, mode: str) -> bool:
    """Whether each model has one batch size per length in `mode` (then a line per model, else per model and B)."""
    keys = [(c["model"], c["seq_len"]) for c in doc["results"] if c["mode"] == mode]
    return len(keys) == len(set(keys))
