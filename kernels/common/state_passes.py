"""The state pass and everything that needs the chunk states, forward and backward, over value-column slices.

The recurrence is separable in the value columns: column j of every state, of v_new and of the output depends only on
column j of v (u), and the gradients of q, k, w and g are sums over the columns. So the passes run on `VALUE_SLICE`
columns at a time: only one slice's chunk states h (and in the backward their gradients dh) are alive at once,
`[NC, H, K, VALUE_SLICE]` each, rather than all V columns' (at the 340M layer's 32K tokens, 850 MiB each for
V = 256), at the price of reading q and k, and computing the chunks' scores Q K^T, once per slice.
"""
# Shapes: T packed time, H heads, K key dim, V value dim, N segments.

from __future__ import annotations

import torch

from .chunk_output import QKWGradients, chunk_output_bwd_dqkwg, chunk_output_bwd_dv, chunk_output_fwd
from .chunk_state import chunk_state_bwd, chunk_state_fwd
from .varlen import ChunkLayout

# Value columns per pass: the states of the 340M layer (V = 256) are made in two halves.
VALUE_SLICE = 128


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _cols(x: torch.Tensor | None, cols: slice) -> torch.Tensor | None:
    return None if x is None else x[..., cols]


def states_and_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None,
                      g_cum: torch.Tensor | None, h0: torch.Tensor | None, layout: ChunkLayout, scale: float,
                      output_final_state: bool, rq: torch.Tensor | None = None, rk: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward: the output o `[1, T, H, V]` (in v.dtype) and the fp32 final states `[N, H, K, V]` (or None).

    q, k: `[1, T, H, K]`, normalised, or raw with their fp32 rstd rq, rk `[1, T, H]` (`l2norm_rstd`); v: the values
    (gated family, w None) or u (delta family, with the WY keys w; overwritten by v_new = u - W h).
    """
    _, T, H, K = k.shape
    V = v.shape[-1]
    o = _empty(v.shape, v.dtype, v.device)
    ht = _empty((layout.num_segments, H, K, V), torch.float32, v.device) if output_final_state else None
    v_new = v if w is not None else None  # written over u, column by column
    for v0 in range(0, V, VALUE_SLICE):
        cols = slice(v0, v0 + VALUE_SLICE)
        h = chunk_state_fwd(k, v[..., cols], w, g_cum, _cols(h0, cols), layout, ht=_cols(ht, cols),
                            v_new=_cols(v_new, cols), rk=rk)
        chunk_output_fwd(q, k, (v if w is None else v_new)[..., cols], h, g_cum, scale, layout, o[..., cols], rq=rq,
                         rk=rk)
        del h
    return o, ht


def state_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None,
                    g_cum: torch.Tensor | None, h0: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
                    layout: ChunkLayout, scale: float, rq: torch.Tensor | None = None,
                    rk: torch.Tensor | None = None) -> tuple[QKWGradients, torch.Tensor, torch.Tensor | None]:
    """Backward of `states_and_output`, recomputing each slice's states.

    The delta family's u (v, with w) is overwritten by v_new, as in the forward.

    Returns the gradients of q, k (normalised, whether or not rq, rk are given), w and g_cum (`QKWGradients`),
    the whole gradient of v_new (delta family; of v for the gated family) `[1, T, H, V]`, and the fp32 gradient of h0
    (None when h0 is None).
    """
    _, T, H, K = k.shape
    V = v.shape[-1]
    grads = QKWGradients.empty(q, delta=w is not None, decay=g_cum is not None)
    # dv_local, made whole in place by the state pass
    dv = chunk_output_bwd_dv(q, k, g_cum, do, scale, layout, rq=rq, rk=rk)
    dh0 = None if h0 is None else _empty(h0.shape, torch.float32, h0.device)
    v_new = v if w is not None else None  # written over u, column by column
    for i, v0 in enumerate(range(0, V, VALUE_SLICE)):
        cols = slice(v0, v0 + VALUE_SLICE)
        h = chunk_state_fwd(k, v[..., cols], w, g_cum, _cols(h0, cols), layout, v_new=_cols(v_new, cols), rk=rk)
        dh, hdh = chunk_state_bwd(q, k, w, g_cum, do[..., cols], dv[..., cols], dv[..., cols], _cols(dht, cols),
                                  _cols(dh0, cols), h, layout, scale, rq=rq, rk=rk)
        chunk_output_bwd_dqkwg(q, k, (v if w is None else v_new)[..., cols], h, dh, hdh, g_cum, do[..., cols],
                               None if w is None else dv[..., cols], scale, layout, grads, accumulate=i > 0,
                               rq=rq, rk=rk)
        del h, dh, hdh
    return grads, dv, dh0
