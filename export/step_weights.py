"""Packed projection weights for decoding: a layer's input projections as one weight, so a step reads x once and
runs one matmul instead of one per memory.

Packing copies the Linear weights into one buffer `[sum of outputs, D]` (zero rows appended up to a multiple of
ROW_MULTIPLE) and makes each Linear's weight a view of its rows: nothing is duplicated, values and state-dict names
are unchanged, and in-place updates (an optimiser step, `load_state_dict`) reach the buffer. A pack goes stale when a
weight is given new storage (`model.to(...)`, `load_state_dict(assign=True)`): the eager step checks the pointers
and packs again; a compiled or exported step
uses the pack made before tracing (`pack_for_decoding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.common.fused_step import StepColumns
from ..mixer import MoMMixer
from ..modules import SwiGLU

# Packed weights get zero rows up to a multiple of this, so the matmul's output rows are 16-byte aligned: cuBLAS fell
# back to a slow sm80 kernel for mom-340m's 12,332 columns (bf16, batch 16 on an H100: 21 us a layer).
ROW_MULTIPLE = 64


@dataclass
class Pack:
    weight: torch.Tensor  # [sum of outputs rounded up to ROW_MULTIPLE, D]
    linears: list[nn.Linear]
    pointers: list[int]  # each linear's weight.data_ptr() right after packing

    def is_current(self) -> bool:
        return all(linear.weight.data_ptr() == p for linear, p in zip(self.linears, self.pointers, strict=True))


def pack_linears(linears: list[nn.Linear]) -> Pack:
    """One buffer holding the weights of `linears` (same input width), each weight now a view of its rows; zero rows
    after them up to a multiple of ROW_MULTIPLE."""
    weights = [linear.weight.detach() for linear in linears]
    rows = sum(w.shape[0] for w in weights)
    padding = weights[0].new_zeros((-rows % ROW_MULTIPLE, weights[0].shape[1]))
    weight = torch.cat([*weights, padding])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[start:start + rows]
        start += rows
    return Pack(weight, linears, [linear.weight.data_ptr() for linear in linears])


def mixer_linears(mixer: MoMMixer) -> tuple[list[nn.Linear], StepColumns]:
    """The mixer's input projections in packed order and where each block starts: router gate (E > 1), q, then per
    slot (E memories, the shared one last) k, v, beta (delta rules), decay (gated rules), then the output gate g."""
    c = mixer.config

    def per_slot(name: str) -> list[nn.Linear]:
        return [*getattr(mixer, f"{name}_proj"), *([getattr(mixer, f"shared_{name}")] if c.shared_memory else [])]

    blocks = [("gate", [mixer.gate] if c.num_memories > 1 else []), ("q", [mixer.q_proj]), ("k", per_slot("k")),
              ("v", per_slot("v")), ("b", per_slot("b") if c.has_beta else []),
              ("a", per_slot("a") if c.has_decay else [])]
    linears, starts, column = [], {}, 0
    for name, block in blocks:
        starts[name] = column if block else -1
        linears += block
        column += sum(linear.weight.shape[0] for linear in block)
    return [*linears, mixer.g_proj], StepColumns(**starts)


def mlp_linears(mlp: SwiGLU) -> list[nn.Linear]:
    return [mlp.gate_proj, mlp.up_proj]


def packed_weight(module: nn.Module, linears: list[nn.Linear]) -> torch.Tensor | None:
    """The packed weight of `module`'s `linears`: packed now if needed in eager mode; while tracing (torch.compile,
    export), the pack made before, or None if there is none (the caller runs the unpacked projections)."""
    pack: Pack | None = getattr(module, "_decode_pack", None)
    if torch.compiler.is_compiling():
        return None if pack is None else pack.weight
    if pack is None or not pack.is_current():
        with torch.no_grad():
            pack = pack_linears(linears)
        module._decode_pack = pack
    return pack.weight


def pack_for_decoding(model: nn.Module) -> None:
    """Pack every MoM layer's and MLP's input projections of `model` (before compiling or exporting its step)."""
    for module in model.modules():
        if isinstance(module, MoMMixer):
            packed_weight(module, mixer_linears(module)[0])
        elif isinstance(module, SwiGLU):
            packed_weight(module, mlp_linears(module))
