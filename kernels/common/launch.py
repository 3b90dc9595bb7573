"""Launch settings shared by the Triton kernels: chunk length, dot precision, autotuning that also runs interpreted."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Every chunkwise kernel cuts time into chunks of this many positions.
CHUNK_SIZE = 64

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for kernels whose inputs are of this dtype, passed as the constexpr DOT: full fp32
    ("ieee") for fp32 inputs unless PyTorch allows TF32 matmuls (`torch.backends.cuda.matmul.allow_tf32`, off by
    default), as torch's own fp32 matmuls do; else "tf32" (Triton's default; bf16/fp16 operands ignore it). It must
    be given at each dot: Triton 3.6 ignores the `default_dot_input_precision` launch option on the GPU."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    """a @ b accumulated in fp32, with DOT (`dot_precision`) as the input precision."""
    return tl.dot(a, b, input_precision=DOT)


def autotune(configs: list[triton.Config], key: list[str], restore: tuple[str, ...] = (), **kwargs):
    """`triton.autotune` on a GPU; under TRITON_INTERPRET=1 (CPU CI) the first config alone, which is not timed.
    Either way the tuner keeps every config as `all_configs`, so tests can run each one.

    restore: tensor arguments the kernel updates in place (None allowed), put back after each config is timed.
    (Triton's own `restore_value` clones None arguments too, and fails on them, in Triton 3.6.)
    """
    if restore:
        kwargs.update(_restoring(restore))
    decorate = triton.autotune(configs[:1] if INTERPRETED else configs, key=key, **kwargs)

    def keeping_all_configs(fn):
        tuner = decorate(fn)
        tuner.all_configs = list(configs)
        return tuner

    return keeping_all_configs


def _restoring(names: tuple[str, ...]) -> dict:
    """Autotune pre/post hooks that save the named tensor arguments before a timed run and put them back after."""
    saved = {}

    def pre_hook(nargs, reset_only=False):
        if not reset_only:
            saved.update({name: nargs[name].clone() for name in names if nargs[name] is not None})

    def post_hook(nargs, exception):
        for name, value in saved.items():
            nargs[name].copy_(value)
        saved.clear()

    return {"pre_hook": pre_hook, "post_hook": post_hook}
