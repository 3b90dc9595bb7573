"""Fused gated RMSNorm, y = x * rsqrt(mean(x^2) + eps) * weight * SiLU(gate): Triton forward and backward."""
# Shapes: M rows (every leading dim flattened), D the normalised dim. The math is in README.md.

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common.launch import INTERPRETED, autotune

MAX_DIM = 16384
# The backward program reduces dweight over this many rows, so the partial sums are [cdiv(M, 128), D] fp32.
BWD_ROWS = 128
# A block holds at most this many elements (BM * BD): a row of up to 4096 with 4+ rows per block stays in registers.
MAX_BLOCK = 16384

CONFIGS = [triton.Config({"BM": bm}, num_warps=nw) for bm, nw in [(8, 4), (4, 4), (16, 4), (16, 8), (32, 8), (2, 4),
                                                                   (1, 4), (1, 8)]]


def _prune(configs, named_args, **kwargs):
    """Drop blocks of more than MAX_BLOCK elements (the smallest block always stays)."""
    BD = {**named_args, **kwargs}["BD"]
    kept = [c for c in configs if c.kwargs["BM"] * BD <= MAX_BLOCK]
    return kept or [min(configs, key=lambda c: c.kwargs["BM"])]


@autotune(CONFIGS, key=["D", "BD"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def gated_rmsnorm_fwd_kernel(x, gate, weight, y, rstd, M, eps, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """y [M, D] and rstd [M] over a grid of M-blocks; one block holds whole rows."""
    i_m = tl.program_id(0)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    o_md = o_m[:, None] * D + o_d[None, :]
    b_x = tl.load(x + o_md, mask=m_md, other=0).to(tl.float32)  # [BM, BD]
    b_z = tl.load(gate + o_md, mask=m_md, other=0).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=m_d, other=0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)  # [BM]
    b_y = b_x * b_rstd[:, None] * b_w[None, :] * (b_z * tl.sigmoid(b_z))
    tl.store(y + o_md, b_y.to(y.dtype.element_ty), mask=m_md)
    tl.store(rstd + o_m, b_rstd, mask=m_m)


@autotune(CONFIGS, key=["D", "BD"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def gated_rmsnorm_bwd_kernel(x, gate, weight, rstd, dy, dx, dgate, dw_part, M, D: tl.constexpr, BD: tl.constexpr,
                             ROWS: tl.constexpr, BM: tl.constexpr):
    """dx, dgate [M, D] and dweight partial sums [cdiv(M, ROWS), D] over a grid of ROWS-blocks."""
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(weight + o_d, mask=m_d, other=0).to(tl.float32)
    b_dw = tl.zeros([BD], dtype=tl.float32)
    row0 = i_p.to(tl.int64) * ROWS
    for i_s in range(0, tl.cdiv(tl.minimum(ROWS, M - row0), BM)):
        o_m = row0 + i_s * BM + tl.arange(0, BM)
        m_m = o_m < M
        m_md = m_m[:, None] & m_d[None, :]
        o_md = o_m[:, None] * D + o_d[None, :]
        b_x = tl.load(x + o_md, mask=m_md, other=0).to(tl.float32)  # [BM, BD]
        b_z = tl.load(gate + o_md, mask=m_md, other=0).to(tl.float32)
        b_dy = tl.load(dy + o_md, mask=m_md, other=0).to(tl.float32)
        b_rstd = tl.load(rstd + o_m, mask=m_m, other=0)  # [BM]
        b_s = tl.sigmoid(b_z)
        b_xhat = b_x * b_rstd[:, None]
        # n = xhat * w and y = n * SiLU(z): dn = dy * SiLU(z), dz = dy * n * SiLU'(z)
        b_dn = b_dy * b_z * b_s
        tl.store(dgate + o_md, (b_dy * b_xhat * b_w[None, :] * b_s * (1 + b_z * (1 - b_s))).to(dgate.dtype.element_ty),
                 mask=m_md)
        b_dw += tl.sum(b_dn * b_xhat, 0)
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dn * w
        b_dxhat = b_dn * b_w[None, :]
        b_dx = b_rstd[:, None] * (b_dxhat - b_xhat * (tl.sum(b_dxhat * b_xhat, 1) / D)[:, None])
        tl.store(dx + o_md, b_dx.to(dx.dtype.element_ty), mask=m_md)
    tl.store(dw_part + i_p.to(tl.int64) * D + o_d, b_dw, mask=m_d)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a launcher fills comes from here, so tests can NaN-poison fresh outputs."""
    return torch.empty(shape, dtype=dtype, device=device)


def gated_rmsnorm_fwd(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Launch the forward on contiguous `[..., D]` inputs: y `[..., D]` in x.dtype and rstd `[...]` fp32."""
    D = x.shape[-1]
    M = x.numel() // D
    y = _empty(tuple(x.shape), x.dtype, x.device)
    rstd = _empty(tuple(x.shape[:-1]), torch.float32, x.device)
    if M > 0:
        def grid(meta):
            return (triton.cdiv(M, meta["BM"]),)

        gated_rmsnorm_fwd_kernel[grid](x, gate, weight, y, rstd, M, eps, D=D, BD=triton.next_power_of_2(D))
    return y, rstd


def gated_rmsnorm_bwd(x: Tensor, gate: Tensor, weight: Tensor, rstd: Tensor, dy: Tensor) -> tuple[Tensor, Tensor,
                                                                                                  Tensor]:
    """Launch the backward: dx, dgate `[..., D]` in their inputs' dtypes, dweight `[D]` in weight.dtype."""
    D = x.shape[-1]
    M = x.numel() // D
    dx = _empty(tuple(x.shape), x.dtype, x.device)
    dgate = _empty(tuple(gate.shape), gate.dtype, x.device)
    if M == 0:
        return dx, dgate, torch.zeros_like(weight)
    num_parts = triton.cdiv(M, BWD_ROWS)
    dw_part = _empty((num_parts, D), torch.float32, x.device)
    gated_rmsnorm_bwd_kernel[(num_parts,)](x, gate, weight, rstd, dy, dx, dgate, dw_part, M, D=D,
                                           BD=triton.next_power_of_2(D), ROWS=BWD_ROWS)
    return dx, dgate, dw_part.sum(0).to(weight.dtype)


@torch.library.custom_op("momctl::gated_rmsnorm", mutates_args=())
def _gated_rmsnorm_op(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return gated_rmsnorm_fwd(x, gate, weight, eps)


@_gated_rmsnorm_op.register_fake
def _(x, gate, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("momctl::gated_rmsnorm_bwd", mutates_args=())
def _gated_rmsnorm_bwd_op(x: Tensor, gate: Tensor, weight: Tensor, rstd: Tensor,
                          dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return gated_rmsnorm_bwd(x, gate, weight, rstd, dy)


@_gated_rmsnorm_bwd_op.register_fake
def _(x, gate, weight, rstd, dy):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, gate, weight, _ = inputs
    ctx.save_for_backward(x, gate, weight, output[1])


def _backward(ctx, dy, drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    dx, dgate, dw = torch.ops.momctl.gated_rmsnorm_bwd(x, gate, weight, rstd, dy.contiguous())
    return dx, dgate, dw, None


_gated_rmsnorm_op.register_autograd(_backward, setup_context=_setup_context)


def gated_rmsnorm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight * SiLU(gate) over the last dim (Triton, one pass per direction).

    Computed in float32; torch.compile-safe (a custom op with autograd), no host synchronisation.

    Args:
        x: `[..., D]` inputs (float16, bfloat16 or float32), D <= 16384.
        gate: `[..., D]` gate pre-activations, same shape (any of those dtypes).
        weight: `[D]` scale (float32 in the model).
        eps: added to the mean square.

    Returns:
        y `[..., D]` in x.dtype; differentiable in x, gate and weight.
    """
    _check_inputs(x, gate, weight)
    y, _ = torch.ops.momctl.gated_rmsnorm(x.contiguous(), gate.contiguous(), weight.contiguous(), float(eps))
    return y


def _check_inputs(x: Tensor, gate: Tensor, weight: Tensor) -> None:
    """ValueError for shapes, dtypes and devices the kernels do not take."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dim() < 1 or x.dtype not in floats or gate.dtype not in floats:
        raise ValueError(f"x and gate must be float16/bfloat16/float32 [..., D] tensors, got {x.dtype}, {gate.dtype}")
    D = x.shape[-1]
    if gate.shape != x.shape or weight.shape != (D,) or not 1 <= D <= MAX_DIM:
        raise ValueError(f"need x, gate [..., D] of one shape and weight [D] with 1 <= D <= {MAX_DIM}, got "
                         f"{tuple(x.shape)}, {tuple(gate.shape)}, {tuple(weight.shape)}")
    if gate.device != x.device or weight.device != x.device:
        raise ValueError(f"x, gate and weight must be on one device, got {x.device}, {gate.device}, {weight.device}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the Triton gated RMSNorm runs on CUDA tensors (or under TRITON_INTERPRET=1), got "
                         f"{x.device}; use gated_rmsnorm_ref on the CPU")
