"""`momctl presets`: the named model configurations."""

import json

from rich.console import Console
from rich.table import Table

from ..presets import PRESETS
from .options import Json


def presets(as_json: Json = False) -> None:
    """List the model presets with their shapes."""
    rows = []
    for name, make in PRESETS.items():
        c = make()
        kind = "transformer" if len(c.attention_layers) == c.num_layers else \
            "hybrid" if c.attention_layers else "gdn" if c.num_memories == 1 else "mom"
        rows.append({"name": name, "kind": kind, "d_model": c.d_model, "layers": c.num_layers,
                     "memories": c.num_memories, "top_k": c.top_k, "shared_memory": c.shared_memory,
                     "heads": c.num_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
                     "attention_layers": list(c.attention_layers), "update_rule": c.update_rule})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("preset", "kind", "D", "layers", "E", "top-k", "shared", "H x K", "vocab", "attention layers")
    for r in rows:
        table.add_row(r["name"], r["kind"], str(r["d_model"]), str(r["layers"]), str(r["memories"]), str(r["top_k"]),
                      "yes" if r["shared_memory"] else "no", f"{r['heads']} x {r['head_dim']}", str(r["vocab"]),
                      ",".join(map(str, r["attention_layers"])) or "-")
    Console().print(table)
