"""Sums over the routed copies of each token, Triton: mixing copies by their weights (forward), the gradient of a
gathered row (the sum of its copies' gradients), and the backward of mixing. One program per token; gathers and
row writes through the token -> copies map, so nothing is atomic and nothing is sorted."""
# Shapes: N tokens, A copies per token, M = N * A copies, C channels, BC channels per block.

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common.launch import autotune

CONFIGS = [triton.Config({"BC": bc}, num_warps=w) for bc, w in [(1024, 4), (512, 4), (2048, 8), (256, 2)]]


def _prune(configs, named_args, **kwargs):
    """Drop blocks much wider than C."""
    C = {**named_args, **kwargs}["C"]
    kept = [c for c in configs if c.kwargs["BC"] <= max(256, triton.next_power_of_2(C))]
    return kept or configs[-1:]


@autotune(CONFIGS, key=["C", "A", "WEIGHTED"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def sum_copies_kernel(x, copy_of_token, weight, out, C: tl.constexpr, A: tl.constexpr, WEIGHTED: tl.constexpr,
                      BC: tl.constexpr):
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_acc = tl.zeros([BC], dtype=tl.float32)
    for a in tl.static_range(A):
        row = tl.load(copy_of_token + i_n * A + a).to(tl.int64)
        b_x = tl.load(x + row * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        if WEIGHTED:
            b_x *= tl.load(weight + i_n * A + a).to(tl.float32)
        b_acc += b_x
    tl.store(out + i_n * C + o_c, b_acc.to(out.dtype.element_ty), mask=m_c)


@autotune(CONFIGS, key=["C", "A"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def mix_copies_bwd_kernel(d, y, copy_of_token, weight, d_y, d_weight, C: tl.constexpr, A: tl.constexpr,
                          BC: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    for a in tl.static_range(A):
        row = tl.load(copy_of_token + i_n * A + a).to(tl.int64)
        b_w = tl.load(weight + i_n * A + a).to(tl.float32)
        b_dot = tl.zeros([BC], dtype=tl.float32)
        for i_c in range(tl.cdiv(C, BC)):
            o_c = i_c * BC + tl.arange(0, BC)
            m_c = o_c < C
            b_d = tl.load(d + i_n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_y = tl.load(y + row * C + o_c, mask=m_c, other=0.0).to(tl.float32)
            tl.store(d_y + row * C + o_c, (b_d * b_w).to(d_y.dtype.element_ty), mask=m_c)
            b_dot += b_d * b_y
        tl.store(d_weight + i_n * A + a, tl.sum(b_dot))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("momctl::sum_copies", mutates_args=())
def sum_copies(x_MC: Tensor, copy_of_token_NA: Tensor, weight_NA: Tensor | None) -> Tensor:
    """out[n] = sum over a of weight[n, a] * x[copy_of_token[n, a]] (weight None: 1), in fp32, returned in x.dtype.

    x_MC `[M, C]` contiguous, copy_of_token_NA int64 `[N, A]`, weight_NA `[N, A]` or None. Returns `[N, C]`.
    """
    N, A = copy_of_token_NA.shape
    C = x_MC.shape[1]
    out = _empty((N, C), x_MC.dtype, x_MC.device)
    if N * C:
        def grid(meta):
            return (N, triton.cdiv(C, meta["BC"]))

        sum_copies_kernel[grid](x_MC, copy_of_token_NA, weight_NA, out, C=C, A=A, WEIGHTED=weight_NA is not None)
    return out


@sum_copies.register_fake
def _(x_MC, copy_of_token_NA, weight_NA):
    return x_MC.new_empty(copy_of_token_NA.shape[0], x_MC.shape[1])


@torch.library.custom_op("momctl::mix_copies_bwd", mutates_args=())
def mix_copies_bwd(d_NC: Tensor, y_MC: Tensor, copy_of_token_NA: Tensor, weight_NA: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of `sum_copies(y, copy_of_token, weight)` given its output gradient d `[N, C]` (contiguous).

    Returns d_y `[M, C]` (d_y[copy_of_token[n, a]] = weight[n, a] * d[n], in y.dtype; every row of y must be some
    token's copy) and d_weight `[N, A]` fp32 (the dot product of d[n] with y[copy_of_token[n, a]]).
    """
    N, A = copy_of_token_NA.shape
    C = y_MC.shape[1]
    d_y = _empty(tuple(y_MC.shape), y_MC.dtype, y_MC.device)
    d_weight = _empty((N, A), torch.float32, y_MC.device)
    if N:
        mix_copies_bwd_kernel[(N,)](d_NC, y_MC, copy_of_token_NA, weight_NA, d_y, d_weight, C=C, A=A)
    return d_y, d_weight


@mix_copies_bwd.register_fake
def _(d_NC, y_MC, copy_of_token_NA, weight_NA):
    return torch.empty_like(y_MC), weight_NA.new_empty(weight_NA.shape, dtype=torch.float32)
