"""Build every preset with random weights, run it forward and by recurrent decode, and print what it costs.

    python examples/smoke_every_preset.py                # all presets (the 1.3B one needs ~8 GB of RAM on a CPU)
    python examples/smoke_every_preset.py tiny small     # some of them
"""

import sys

import torch

from momctl import PRESETS, get_preset
from momctl.smoke import run_smoke


def main(names: list[str]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in names or list(PRESETS):
        report = run_smoke(get_preset(name), batch_size=1, seq_len=16, device=device)
        print(f"{name:18s} {report.parameters / 1e6:8.1f}M params  state {report.state_bytes_per_sequence / 2**20:7.2f}"
              f" MiB/seq  decode vs forward {report.max_rel_error:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
