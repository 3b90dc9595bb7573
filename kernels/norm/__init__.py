"""Fused gated RMSNorm: RMSNorm(x) * weight * SiLU(gate) (the MoM layer's per-head output norm).

`naive.gated_rmsnorm_ref` is the pure-PyTorch truth; `gated_rmsnorm.gated_rmsnorm` the Triton kernels (import it
from its module: it needs Triton).
"""

from .naive import gated_rmsnorm_ref

__all__ = ["gated_rmsnorm_ref"]
