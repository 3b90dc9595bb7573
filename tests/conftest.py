"""Session-wide test setup: without CUDA, Triton kernels run in its interpreter.

Triton binds its language functions when first imported, so TRITON_INTERPRET must be set before any test module
imports it; a conftest at the root of tests/ is loaded before every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
