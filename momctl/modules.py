"""Small building blocks shared by the blocks of every model: norms, the SwiGLU MLP, the short convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import use_kernels


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (reductions and gates run at this precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with an fp32 weight, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = at_least_fp32(x)
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * weight * SiLU(gate): the MoM layer's per-head output norm (FLA `FusedRMSNormGated`)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Under torch.compile the plain ops below fuse with their neighbours (one kernel less per decode step).
        if use_kernels(x) and not torch.compiler.is_compiling():
            from .kernels.norm.gated_rmsnorm import gated_rmsnorm

            return gated_rmsnorm(x, gate, self.weight, self.eps)
        y = at_least_fp32(x)
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype) * F.silu(gate.to(y.dtype))).to(x.dtype)


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConvWeight(nn.Module):
    """Holds a depthwise causal conv filter `weight [C, 1, W]` under FLA's name (`q_conv1d.weight`, ...)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        # nn.Conv1d's default init for a depthwise filter: U(-1/sqrt(W), 1/sqrt(W)).
        nn.init.uniform_(self.weight, -width ** -0.5, width ** -0.5)


def short_conv(u_NLC: torch.Tensor, weight_CW: torch.Tensor, cache_NWC: torch.Tensor,
               lengths_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over N sequences whose first `lengths` positions are real.

    y_i = SiLU(sum_j w[:, j] * u_{i-W+1+j}), with the cached last W-1 inputs as history before position 0.

    Args:
        u_NLC: inputs `[N, L, C]`; positions at or past `lengths` are ignored.
        weight_CW: filter `[C, W]`.
        cache_NWC: the previous W-1 inputs `[N, W-1, C]` (zeros at a sequence start).
        lengths_N: real positions per sequence `[N]` (int64).

    Returns:
        y `[N, L, C]` (garbage past `lengths`) and the new cache `[N, W-1, C]`: the last W-1 inputs, so a sequence
        with no new positions keeps its cache.
    """
    N, L, C = u_NLC.shape
    W = weight_CW.shape[1]
    full_NXC = torch.cat([cache_NWC.to(u_NLC.dtype), u_NLC], dim=1)  # [N, W-1+L, C]
    weight_CW = weight_CW.to(u_NLC.dtype)
    # W shifted multiply-adds: as fast as conv1d for W = 4 and the same in every dtype (conv1d is slow in fp64).
    y_NLC = sum(full_NXC[:, j:j + L] * weight_CW[:, j] for j in range(W))
    # The last W-1 real inputs sit at indices lengths .. lengths+W-2 of the concatenation.
    index_NW = lengths_N[:, None] + torch.arange(W - 1, device=u_NLC.device)
    new_cache = full_NXC.gather(1, index_NW[..., None].expand(N, W - 1, C))
    return F.silu(y_NLC), new_cache


def short_conv_varlen(u_MC: torch.Tensor, weight_CW: torch.Tensor, cu_seqlens: torch.Tensor,
                      cache_NWC: torch.Tensor | None, output_final_cache: bool):
    """`short_conv` over segments packed along one axis (offsets `cu_seqlens [N+1]`): our Triton kernel when
    `use_kernels` says so, the pure-PyTorch reference otherwise. Returns y `[M, C]` and the new cache (or None)."""
    if use_kernels(u_MC):
        from .kernels.conv.short_conv import short_conv_varlen as fn
    else:
        from .kernels.conv.naive import short_conv_varlen_ref as fn
    return fn(u_MC, weight_CW, cu_seqlens, cache_NWC, output_final_cache)


def short_conv_varlen_bwd(u_MC: torch.Tensor, weight_CW: torch.Tensor, cu_seqlens: torch.Tensor,
                          cache_NWC: torch.Tensor | None, d_y: torch.Tensor, d_new_cache: torch.Tensor | None,
                          need_dcache: bool, d_u: torch.Tensor | None = None):
    """The backward of `short_conv_varlen` for callers that keep their own inputs: the gradients of u, the filter and
    the cache (None unless need_dcache), from those of y and of the new cache (or None). u's gradient is written into
    d_u when given (`[M, C]`, rows may be strided: a column slice of a wider gradient). Our Triton kernel (opaque to
    torch.compile) when `use_kernels` says so, autograd through the pure-PyTorch reference otherwise."""
    if use_kernels(u_MC):
        from .kernels.conv.short_conv import short_conv_varlen_bwd as fn

        return fn(u_MC, weight_CW, cu_seqlens, cache_NWC, d_y, d_new_cache, need_dcache, d_u)
    from .kernels.conv.naive import short_conv_varlen_ref

    need_dcache = cache_NWC is not None and need_dcache
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (u_MC, weight_CW) + ((cache_NWC,) if need_dcache else ())]
        y, new_cache = short_conv_varlen_ref(inputs[0], inputs[1], cu_seqlens, inputs[2] if need_dcache else cache_NWC,
                                             d_new_cache is not None)
        outputs, grads = ([y, new_cache], [d_y, d_new_cache]) if d_new_cache is not None else ([y], [d_y])
        d_inputs = torch.autograd.grad(outputs, inputs, grads)
    d_u_MC = d_inputs[0] if d_u is None else d_u.copy_(d_inputs[0])
    return d_u_MC, d_inputs[1], d_inputs[2] if need_dcache else None
