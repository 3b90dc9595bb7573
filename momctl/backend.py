"""Which implementation runs the layer's heavy parts: our Triton kernels or the pure-PyTorch references.

`MOMCTL_KERNELS=auto` (default) uses the kernels on CUDA tensors and the references elsewhere; `triton` forces the
kernels (on CPU they need `TRITON_INTERPRET=1`, for tests); `reference` forces the references.
"""

from __future__ import annotations

import os

import torch

CHOICES = ("auto", "triton", "reference")


def use_kernels(x: torch.Tensor) -> bool:
    choice = os.environ.get("MOMCTL_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"MOMCTL_KERNELS={choice!r} is invalid: expected one of {', '.join(CHOICES)}")
    if choice == "auto":
        return x.is_cuda
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"MOMCTL_KERNELS=triton needs CUDA tensors, got {x.device} (TRITON_INTERPRET=1 runs the "
                         "kernels interpreted, for tests); unset MOMCTL_KERNELS or set it to reference")
    return choice == "triton"
