"""Timing one call: warm-up apart, then repeats timed one by one; medians with p20/p80; peak memory on GPUs.

On CUDA every repeat is bracketed by CUDA events after the L2 cache is flushed (a 256 MiB buffer is zeroed, as
triton's do_bench does), so a repeat never reads what the previous one left in cache. On a CPU a repeat is timed by
perf_counter. Peak memory is only measured on CUDA (reset, one more call, max allocated); on a CPU it is None.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .settings import WARMUP_CALLS

L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    warmup_s: float  # wall time of the untimed warm-up calls (compile, autotune, first allocations)

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "repeats": self.repeats,
                "warmup_s": self.warmup_s}


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list (q in [0, 1])."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], object], device: torch.device, calls: int = WARMUP_CALLS) -> float:
    """Run `fn` `calls` times untimed; returns their wall time in seconds."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> Timing:
    """Warm up, then time `repeats` calls of `fn` one by one (CUDA events with L2 flushes, or perf_counter)."""
    warmup_s = warm_up(fn, device)
    times_ms = _time_cuda(fn, device, repeats) if device.type == "cuda" else _time_host(fn, repeats)
    return Timing(median_ms=quantile(times_ms, 0.5), p20_ms=quantile(times_ms, 0.2), p80_ms=quantile(times_ms, 0.8),
                  repeats=repeats, warmup_s=warmup_s)


def _time_host(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _time_cuda(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    del flush  # freed before peak memory is measured
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Bytes allocated before one more call of `fn` and the peak during it (CUDA); Nones on other devices.

    Both count the memory that CUDA-graph pools hold beyond their live tensors: a replay writes its intermediates
    there without the allocator seeing them allocated, so it is in use whenever a graph runs."""
    if device.type != "cuda":
        return {"peak_bytes": None, "base_bytes": None}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    pools = graph_pool_idle_bytes(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device) + pools, "base_bytes": base + pools}


def graph_pool_idle_bytes(device: torch.device) -> int:
    """Bytes of `device`'s private (CUDA-graph) memory pools not held by a live tensor."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(segment["total_size"] - segment["allocated_size"] for segment in torch.cuda.memory_snapshot()
               if segment["device"] == index and tuple(segment["segment_pool_id"]) != (0, 0))
