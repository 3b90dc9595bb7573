"""Pure-PyTorch reference of the gated RMSNorm: RMSNorm(x) * weight * SiLU(gate)."""
# Shapes: D the normalised (last) dim.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_rmsnorm_ref(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight * SiLU(gate) over the last dim (the reference truth).

    Args:
        x: `[..., D]` inputs.
        gate: `[..., D]` gate pre-activations.
        weight: `[D]` scale (float32 in the model).
        eps: added to the mean square.

    Returns:
        y `[..., D]` in x.dtype, computed in float32 (float64 for float64 inputs); differentiable in all three.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(dtype) * F.silu(gate.to(dtype))).to(x.dtype)
