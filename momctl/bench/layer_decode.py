"""One layer's decoding for `--layer --mode decode`: the layer prefilled on random activations, then one-token
steps on a one-layer `StepState` (a MoM layer's memories, or an attention layer's KV cache). The same step runs
eagerly or under `CompiledStep` (its `step_fn`).

Legend: B batch, T time, D d_model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import Attention
from ..export.step import attention_step, mom_step
from ..state import InferenceState, StepState


def layer_prefill(layer: nn.Module, x_BTD: torch.Tensor, state: InferenceState | None):
    """The layer over `x_BTD` from `state` (None: empty). Returns y `[B, T, D]` and the state after it."""
    B, T, _ = x_BTD.shape
    before = 0 if state is None else int(state.positions[0])
    positions_B = torch.full((B,), before + T, dtype=torch.long, device=x_BTD.device)
    previous = None if state is None else state.layers[0]
    if isinstance(layer, Attention):
        positions_BT = torch.arange(before, before + T, device=x_BTD.device).expand(B, T)
        valid_BT = None if previous is None else torch.ones(B, T, dtype=torch.bool, device=x_BTD.device)
        y_BTD, new = layer(x_BTD, valid_BT, positions_BT, previous, True)
    else:
        out = layer(x_BTD, torch.ones(B, T, dtype=torch.bool, device=x_BTD.device), previous, True)
        y_BTD, new = out.y_BTD, out.state
    return y_BTD, InferenceState(layers=[new], positions=positions_B)


def layer_step(layer: nn.Module, x_BD: torch.Tensor, state: StepState, out: StepState | None = None):
    """One token per sequence through the layer (`decode_step`'s contract: new tensors, or written into `out`)."""
    if isinstance(layer, Attention):
        y_BD, new = attention_step(layer, x_BD, state.positions, state.layers[0], out is not None)
    else:
        y_BD, new = mom_step(layer, x_BD, state.layers[0], None if out is None else out.layers[0])
    positions = state.positions + 1 if out is None else torch.add(state.positions, 1, out=out.positions)
    cache_length = state.cache_length + 1 if state.capacity is not None else 0
    return y_BD, StepState(layers=[new], positions=positions, cache_length=cache_length)
