"""Registers, spills and shared memory of our Triton kernels on an H100, per autotune config, without a GPU.

Each kernel is compiled by the installed Triton for sm_90 at the 340M layer's shapes (bf16, H = 4, K = V = 256, chunks
of 64, the gated delta rule with its q/k l2 norm, the backward's value slices), and the PTX is assembled by the ptxas
that ships with Triton, whose report gives the numbers. Spills show where a kernel runs out of registers; compare two
trees by running this from each (the GPU image has Triton 3.6; a newer Triton compiles differently, so compare like
with like: `pip install --target DIR triton==3.6.0` and put DIR first on PYTHONPATH).

    python3 benchmarks/kernel_registers.py [KERNEL ...]     (default: every kernel below)
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Pointer arguments are bf16 unless named here; scalars must be named (Triton compiles to their types).
_F32 = "*fp32"
_INDEX = {"cu_seqlens": "*i32", "chunk_indices": "*i32", "chunk_offsets": "*i32", "rows": "*i64"}
_RULE = dict(H=4, K=256, BT=64, USE_G=True, NORM=True, DELTA=True, DOT="tf32", IEEE=False)


def _specs() -> dict[str, Callable[[], tuple]]:
    """Kernel name -> a function returning (autotuner, argument types, constexprs) at the 340M layer's shapes."""
    from momctl.kernels.common import chunk_output, chunk_state, l2norm, state_passes
    from momctl.kernels.conv import short_conv
    from momctl.kernels.gated_delta import wy

    back = state_passes.VALUE_SLICE
    fwd = getattr(state_passes, "FORWARD_VALUE_SLICE", back)
    state = dict(_RULE, VF=256, BKS=64, NKS=4)
    norms = {"rq": _F32, "rk": _F32, "g": _F32, "scale": "fp32"}
    conv = {"stride_x": "i64", "stride_dx": "i64", "weight": _F32, "T": "i64", "N": "i32", "n_steps": "i32",
            "dw_part": _F32}
    return {
        "wy_fwd": lambda: (wy.wy_fwd_kernel, {"rk": _F32, "g": _F32, "A_inv": _F32},
                           dict(_RULE, V=256, BS=16, BK=64, BV=64, SOLVE=True)),
        "wy_bwd": lambda: (wy.wy_bwd_kernel, {"rk": _F32, "g": _F32, "A_inv": _F32, "dg": _F32},
                           dict(_RULE, V=256, HAS_DK_STATE=True)),
        "state_fwd": lambda: (chunk_state.chunk_state_fwd_kernel, {**norms, "h0": _F32, "ht": _F32, "N_BUCKET": "i32"},
                              dict(state, V=back, USE_H0=False, STORE_HT=False, STORE_V_NEW=True)),
        "state_bwd": lambda: (chunk_state.chunk_state_bwd_kernel,
                              {**norms, "dht": _F32, "dh0": _F32, "hdh": _F32, "N_BUCKET": "i32", "NC": "i32"},
                              dict(state, V=back, USE_DHT=False, STORE_DH0=False, STORE_HDH=True)),
        "output_fwd": lambda: (chunk_output.chunk_output_fwd_kernel, norms,
                               dict(_RULE, V=fwd, VF=256, BK=64, BV=min(fwd, 128))),
        "output_dv": lambda: (chunk_output.chunk_output_bwd_kernel_dv, {**norms, "sq": _F32},
                              dict(_RULE, V=256, BK=64, BV=128, ROW_DOT=True)),
        "output_dqkwg": lambda: (chunk_output.chunk_output_bwd_kernel_dqkwg,
                                 {**norms, "hdh": _F32, "dg": _F32, "sq": _F32, "NC": "i32"},
                                 dict(_RULE, V=back, VF=256, BK=64, BV=64, ACCUMULATE=True, NORM_DQ=True, HDH_ROWS=4,
                                      BR=4)),
        "conv_fwd": lambda: (short_conv.short_conv_fwd_kernel_out, conv, dict(C=1024, W=4, HAS_CACHE=False)),
        "conv_bwd_grad": lambda: (short_conv.short_conv_bwd_kernel_grad, conv,
                                  dict(C=1024, W=4, HAS_CACHE=False, BW=4, ROWS=short_conv.BWD_ROWS)),
        "conv_bwd_dx": lambda: (short_conv.short_conv_bwd_kernel_dx, conv, dict(C=1024, W=4, HAS_DNC=False, BW=4)),
        "l2norm_rstd": lambda: (l2norm.l2norm_rstd_kernel, {"rstd": _F32, "R": "i32"},
                                dict(D=256, BR=16, BD=256, EPS=1e-6)),
    }


def ptxas_usage(ptx: str, maxnreg: int | None = None) -> tuple[int, int, int]:
    """(registers per thread, spill stores, spill loads in bytes) of sm_90 code for this PTX, from ptxas -v."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for exe in ("ptxas", "ptxas-blackwell"):  # a newer Triton writes PTX that only its newer ptxas reads
            cmd = [os.path.join(bindir, exe), "--gpu-name", "sm_90a", "-v", path, "-o", os.devnull]
            report = subprocess.run(cmd + (["--maxrregcount", str(maxnreg)] if maxnreg else []),
                                    capture_output=True, text=True).stderr
            if "Unsupported .version" not in report:
                break
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas gave no usage report: {report.strip()[-300:]}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def config_usage(tuner, types: dict[str, str], constexprs: dict) -> list[dict]:
    """One row per autotune config of `tuner` (our `launch.autotune`): its settings and its usage on sm_90."""
    fn = tuner.fn
    params = list(inspect.signature(fn.fn).parameters)
    rows = []
    for config in tuner.all_configs:
        consts = {k: v for k, v in {**constexprs, **config.kwargs}.items() if k in params}
        if "GATHER" in params:
            consts.setdefault("GATHER", False)
        signature = {n: "constexpr" if n in consts else types.get(n, _INDEX.get(n, "*bf16")) for n in params}
        source = ASTSource(fn, signature, constexprs={(params.index(k),): v for k, v in consts.items()})
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        maxnreg = getattr(config, "maxnreg", None)
        if maxnreg:
            options["maxnreg"] = maxnreg
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        regs, spill_stores, spill_loads = ptxas_usage(compiled.asm["ptx"], maxnreg)
        rows.append(dict(config=" ".join(f"{k}={v}" for k, v in config.kwargs.items()), warps=config.num_warps,
                         stages=config.num_stages, registers=regs, spill_stores=spill_stores,
                         spill_loads=spill_loads, shared=compiled.metadata.shared))
    return rows


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: the kernels must be compiled; unset it", file=sys.stderr)
        return 1
    specs = _specs()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", metavar="KERNEL", help=f"any of: {', '.join(specs)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.kernels if name not in specs]
    if unknown:
        print(f"error: unknown kernel {', '.join(unknown)}; pick from {', '.join(specs)}", file=sys.stderr)
        return 1
    print(f"Triton {triton.__version__}, sm_90 (ptxas -v); spills in bytes per thread")
    print(f"{'kernel':14} {'config':18} {'warps':>5} {'stages':>6} {'regs':>5} {'spill st/ld':>12} {'smem':>7}")
    for name in args.kernels or specs:
        tuner, types, constexprs = specs[name]()
        for row in config_usage(tuner, types, constexprs):
            spill = f"{row['spill_stores']}/{row['spill_loads']}"
            print(f"{name:14} {row['config']:18} {row['warps']:>5} {row['stages']:>6} {row['registers']:>5} "
                  f"{spill:>12} {row['shared']:>7}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
