"""Where a benchmark ran: device, driver, library versions and the commit of the code (MOMCTL_COMMIT overrides git)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from .models import fla_version


def environment(device: torch.device) -> dict:
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "driver": _driver() if device.type == "cuda" else None, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _triton_version(), "python": platform.python_version(), "platform": platform.platform(),
            "commit": os.environ.get("MOMCTL_COMMIT") or _git_commit(), "fla": fla_version()}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


SOURCE = Path(__file__).resolve().parent


def _git_commit(source: Path = SOURCE) -> str | None:
    """The commit of the momctl source tree that runs (not of the current directory), with `+dirty` when tracked
    files differ from it: then the numbers are of code that no commit holds."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30,
                              cwd=source).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if commit and dirty else commit or None
