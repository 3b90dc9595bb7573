"""One MoM layer (the paper's 340M layer) against flash-linear-attention, side by side in one run, on one GPU.

Models: `ours` (momctl MoMMixer), `fla-mom` (FLA `MomAttention`, the reference), `fla-gdn` (FLA `GatedDeltaNet`,
one memory) and `sdpa` (momctl's softmax attention layer of the same width, SDPA flash kernels). Every model sees
the same random bf16 input of `--tokens` tokens per batch at each sequence length; the median of repeated runs after
warm-up is reported for forward only (no autograd) and forward+backward, with peak memory of the training step.

    python3 benchmarks/layer_bench.py --json benchmarks/results/layer_h100.json

FLA is optional (`pip install flash-linear-attention==0.6.0`); models that cannot be built are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

from momctl.attention import Attention
from momctl.fla_compat import config_to_fla
from momctl.mixer import MoMMixer
from momctl.presets import get_preset

GIB = 2**30


def layer_config():
    """The paper's 340M MoM layer: D=1024, H=4, K=V=256, E=4, top-2, shared memory, conv 4."""
    return replace(get_preset("mom-340m"), num_layers=1)


def build_ours(dtype):
    mixer = MoMMixer(layer_config()).cuda().to(dtype)

    def run(x):
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return mixer(x, valid, None, False).y_BTD

    return mixer, run


def _fla_ready():
    import fla.ops.common.chunk_o as chunk_o

    # FLA refuses gated backwards on Hopper with Triton < 3.7.1 (its issue #640, a miscompile at BK=64); with
    # head_dim 256 its kernels use BK=128, where the bug does not appear (checked against its naive kernel below).
    chunk_o.TRITON_ABOVE_3_7_1 = True


def build_fla_mom(dtype):
    _fla_ready()
    from fla.models import MomConfig, MomForCausalLM

    fla_config = config_to_fla(layer_config())
    fla_config.pop("model_type")
    model = MomForCausalLM(MomConfig(**fla_config))
    layer = model.model.layers[0].attn.cuda().to(dtype)
    del model
    return layer, lambda x: layer(x)[0]


def build_fla_gdn(dtype):
    _fla_ready()
    from fla.layers import GatedDeltaNet

    c = layer_config()
    layer = GatedDeltaNet(hidden_size=c.d_model, head_dim=c.head_dim, num_heads=c.num_heads, expand_v=c.expand_v,
                          mode="chunk", use_short_conv=True, conv_size=c.conv_size).cuda().to(dtype)
    return layer, lambda x: layer(x)[0]


def build_sdpa(dtype):
    config = replace(get_preset("transformer-340m"), num_layers=1, attention_layers=(0,))
    layer = Attention(config).cuda().to(dtype)

    def run(x):
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T)
        return layer(x, None, positions, None, False)[0]

    return layer, run


BUILDERS: dict[str, Callable] = {"ours": build_ours, "fla-mom": build_fla_mom, "fla-gdn": build_fla_gdn,
                                 "sdpa": build_sdpa}


def forward_flops(tokens: int) -> float:
    """Matmul FLOPs of one forward of our layer (the work, not what any implementation spends on padding).

    Projections: q, output gate, o_proj and router once per token; k, v, beta, decay once per routed copy.
    Recurrence per copy and head, chunked with C = 64: 3KV (w h, q h, k^T v_new) + C(3K + 2V) (k k^T, solve products,
    q k^T, attention times values). A training step counts three forwards.
    """
    c = layer_config()
    A, C = c.top_k + c.shared_memory, 64
    K, V, H = c.head_dim, c.head_v_dim, c.num_heads
    per_token = c.d_model * (c.key_dim + 2 * c.value_dim + c.num_memories)
    per_copy = c.d_model * (c.key_dim + c.value_dim + 2 * H) + H * (3 * K * V + C * (3 * K + 2 * V))
    return 2.0 * tokens * (per_token + A * per_copy)


KERNEL_CLASSES = [("projections", ("gemm", "cutlass", "nvjet", "sm90", "grouped_mm", "xmma", "splitk")),
                  ("conv", ("short_conv",)),
                  ("recurrence", ("chunk", "wy", "cumsum", "l2norm", "solve")),
                  ("norm", ("rmsnorm",))]


def time_breakdown(step) -> dict:
    """GPU time of one call of `step` by kernel class (profiler), as fractions; the rest is routing/elementwise."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0.0))
    for event in events[:12]:
        print(f"    {getattr(event, 'device_time_total', 0.0) / 1e3:7.3f} ms  {event.key[:100]}")
    for event in prof.key_averages():
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if us <= 0:
            continue
        name = event.key.lower()
        cls = next((c for c, pats in KERNEL_CLASSES if any(p in name for p in pats)), "routing_and_elementwise")
        totals[cls] = totals.get(cls, 0.0) + us
    whole = sum(totals.values()) or 1.0
    return {cls: us / whole for cls, us in sorted(totals.items())}


def median_ms(fn, repeats: int) -> dict:
    q20, q50, q80 = do_bench(fn, warmup=50, rep=repeats, quantiles=[0.2, 0.5, 0.8])
    return {"median_ms": q50, "p20_ms": q20, "p80_ms": q80}


def measure(run, params, batch: int, seq_len: int, dtype, repeats: int, breakdown: bool) -> dict:
    D = layer_config().d_model
    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    x = torch.randn(batch, seq_len, D, device="cuda", dtype=dtype, generator=gen)
    dy = torch.randn(batch, seq_len, D, device="cuda", dtype=dtype, generator=gen)
    out = {}
    start = time.perf_counter()
    with torch.no_grad():
        run(x)
    x.requires_grad_(True)
    run(x).backward(dy)
    torch.cuda.synchronize()
    out["first_call_s"] = time.perf_counter() - start  # compile + autotune, reported apart from the timings

    with torch.no_grad():
        out["forward"] = median_ms(lambda: run(x), repeats)

    def train_step():
        for p in params:
            p.grad = None
        x.grad = None
        run(x).backward(dy)

    out["train"] = median_ms(train_step, repeats)
    train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step()
    torch.cuda.synchronize()
    out["train"]["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    out["train"]["peak_above_inputs_gib"] = (torch.cuda.max_memory_allocated() - before) / GIB
    tokens = batch * seq_len
    for mode, flops in (("forward", forward_flops(tokens)), ("train", 3 * forward_flops(tokens))):
        out[mode]["tokens_per_s"] = tokens / (out[mode]["median_ms"] / 1e3)
        out[mode]["tflops_per_s"] = flops / (out[mode]["median_ms"] / 1e3) / 1e12
    if breakdown:
        out["train"]["time_fractions"] = time_breakdown(train_step)
    return out


def environment() -> dict:
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "commit": os.environ.get("MOMCTL_COMMIT") or _git_commit()}
    try:
        import fla

        env["fla"] = fla.__version__
    except ImportError:
        env["fla"] = None
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["driver"] = None
    return env


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / seq_len)")
    parser.add_argument("--models", default="ours,fla-mom,fla-gdn,sdpa")
    parser.add_argument("--repeats", type=int, default=300, help="milliseconds of timed repeats per measurement")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"benchmark": "mom-layer", "config": layer_config().__dict__ | {"dtype": "bfloat16"},
              "tokens_per_batch": args.tokens, "environment": environment(), "results": {}}
    print(result["environment"])
    for name in args.models.split(","):
        try:
            layer, run = BUILDERS[name](dtype)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            result["results"][name] = {"skipped": str(e)}
            continue
        params = list(layer.parameters())
        rows = result["results"][name] = {}
        for seq_len in map(int, args.seq_lens.split(",")):
            try:
                rows[seq_len] = measure(run, params, args.tokens // seq_len, seq_len, dtype, args.repeats,
                                        breakdown=name == "ours")
            except torch.cuda.OutOfMemoryError:
                rows[seq_len] = "OOM"
            torch.cuda.empty_cache()
            if args.json:  # after every cell, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
            r = rows[seq_len]
            if r == "OOM":
                print(f"{name:8s} T={seq_len:6d} OOM")
                continue
            print(f"{name:8s} T={seq_len:6d} fwd {r['forward']['median_ms']:7.2f} ms  train "
                  f"{r['train']['median_ms']:7.2f} ms  {r['train']['tokens_per_s'] / 1e3:8.0f}k tok/s  peak "
                  f"{r['train']['peak_gib']:.2f} GiB  first call {r['first_call_s']:.1f} s  "
                  f"{r['train'].get('time_fractions', '')}", flush=True)
        del layer, run, params
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
