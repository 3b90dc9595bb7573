"""Where GPU time goes in one call: the torch profiler's kernels, grouped into classes by name (CUDA only)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Kernel-name fragments of each class, first match wins; a kernel matching none is routing / gathers / elementwise.
# ONNX Runtime's fused recurrent kernels (LinearAttention..., CausalConv...) are named before attention's fragments.
KERNEL_CLASSES = [("recurrence", ("chunk", "wy", "cumsum", "l2norm", "solve", "fused_mom_step", "linearattention")),
                  ("conv", ("short_conv", "causalconv")),
                  ("attention", ("flash", "fmha", "attention")),
                  ("projections", ("gemm", "cutlass", "nvjet", "sm90", "grouped_mm", "xmma", "splitk")),
                  ("norm", ("rmsnorm", "layernorm"))]
TOP_KERNELS = 12


def kernel_class(name: str) -> str:
    """The class of a kernel by its name: the first of KERNEL_CLASSES with a matching fragment, else
    `routing_and_elementwise`."""
    name = name.lower()
    return next((c for c, parts in KERNEL_CLASSES if any(p in name for p in parts)), "routing_and_elementwise")


def time_breakdown(fn: Callable[[], object], device: torch.device) -> dict:
    """Profile one call of `fn`. Returns `time_fractions` (class -> fraction of GPU time), `launches` (kernels the
    call ran) and `top_kernels` (the 12 kernels with the most GPU time: name and milliseconds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    kernels = []
    launches = 0
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = event.cuda_time_total
        if us <= 0:
            continue
        kernels.append((event.key, us))
        launches += event.count
        cls = kernel_class(event.key)
        totals[cls] = totals.get(cls, 0.0) + us
    whole = sum(totals.values()) or 1.0
    kernels.sort(key=lambda kv: -kv[1])
    return {"time_fractions": {cls: us / whole for cls, us in sorted(totals.items())}, "launches": launches,
            "top_kernels": [{"name": name[:160], "ms": us / 1e3} for name, us in kernels[:TOP_KERNELS]]}
