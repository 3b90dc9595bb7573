"""Launch settings shared by the Triton kernels: the chunk length, and autotuning that also runs interpreted."""

from __future__ import annotations

import os

import triton

# Every chunkwise kernel cuts time into chunks of this many positions.
CHUNK_SIZE = 64

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """`triton.autotune` on a GPU; under TRITON_INTERPRET=1 (CPU CI) the first config alone, which is not timed."""
    return triton.autotune(configs[:1] if INTERPRETED else configs, key=key, **kwargs)
