"""benchmarks/kernel_registers.py: our kernels compiled for sm_90 on the CPU, registers and spills from ptxas."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_registers.py"


def run(*args, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**environ, **env})


def test_one_row_per_autotune_config_with_registers_and_spills():
    from momctl.kernels.common.l2norm import l2norm_rstd_kernel

    result = run("l2norm_rstd")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("l2norm_rstd")]
    assert [int(row[1]) for row in rows] == [c.num_warps for c in l2norm_rstd_kernel.all_configs]
    for row in rows:
        registers, spills = int(row[3]), row[4].split("/")
        assert 0 < registers <= 255 and len(spills) == 2 and all(s.isdigit() for s in spills)


def test_unknown_kernel_and_the_interpreter_are_one_line_errors():
    result = run("no_such_kernel")
    assert result.returncode == 1 and result.stderr.startswith("error: unknown kernel no_such_kernel")
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("l2norm_rstd", TRITON_INTERPRET="1")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "TRITON_INTERPRET" in result.stderr
