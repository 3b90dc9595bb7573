"""Pure-PyTorch references of the routed-copy sums: mixing the copies of each token, and the backward of mixing."""
# Shapes: N tokens, A copies per token, M = N * A copies, C channels.

from __future__ import annotations

import torch
from torch import Tensor


def sum_copies_ref(x_MC: Tensor, copy_of_token_NA: Tensor, weight_NA: Tensor | None) -> Tensor:
    """out[n] = sum over a of weight[n, a] * x[copy_of_token[n, a]] (weight None: 1), in fp32, returned in x.dtype.

    Args:
        x_MC: `[M, C]` copy rows.
        copy_of_token_NA: int64 `[N, A]`, the rows of token n's copies.
        weight_NA: `[N, A]` weights, or None.

    Returns:
        `[N, C]` in x.dtype.
    """
    N, A = copy_of_token_NA.shape
    x_NAC = x_MC.index_select(0, copy_of_token_NA.reshape(-1)).reshape(N, A, -1).to(torch.promote_types(
        x_MC.dtype, torch.float32))
    if weight_NA is not None:
        x_NAC = x_NAC * weight_NA[..., None].to(x_NAC.dtype)
    return x_NAC.sum(1).to(x_MC.dtype)


def mix_copies_bwd_ref(d_NC: Tensor, y_MC: Tensor, copy_of_token_NA: Tensor, weight_NA: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """The backward of `sum_copies_ref(y, copy_of_token, weight)` given its output gradient d `[N, C]`.

    Returns d_y `[M, C]` (d_y[copy_of_token[n, a]] = weight[n, a] * d[n], in y.dtype) and d_weight `[N, A]` in
    at least fp32 (the dot product of d[n] with y[copy_of_token[n, a]]).
    """
    N, A = copy_of_token_NA.shape
    dtype = torch.promote_types(y_MC.dtype, torch.float32)
    d_NC = d_NC.to(dtype)
    d_NAC = d_NC[:, None] * weight_NA[..., None].to(dtype)
    d_y = torch.empty_like(y_MC)
    d_y[copy_of_token_NA.reshape(-1)] = d_NAC.reshape(N * A, -1).to(y_MC.dtype)
    y_NAC = y_MC.index_select(0, copy_of_token_NA.reshape(-1)).reshape(N, A, -1).to(dtype)
    return d_y, (y_NAC * d_NC[:, None]).sum(-1)
