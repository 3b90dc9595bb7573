"""The recurrent inference state: fixed size per MoM layer, a growing KV cache per attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MemoryState:
    """One MoM layer: every memory's matrix and conv window. Slots are the E routed memories, then the shared one.

    memory: `[B, S, H, K, V]` fp32.
    conv: `[B, S, W-1, C]` fp32, the last W-1 conv inputs of each slot (C = q, k, v channels concatenated).
    """

    memory: torch.Tensor
    conv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes + self.conv.nbytes


@dataclass
class AttentionState:
    """One attention layer's KV cache: keys/values `[B, Hkv, L, d]` and which cached positions are real `[B, L]`."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.valid.nbytes


@dataclass
class InferenceState:
    """The whole model's state between prefill and step calls. `positions [B]` counts the real tokens seen."""

    layers: list[MemoryState | AttentionState]
    positions: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held, all sequences together."""
        return sum(layer.nbytes for layer in self.layers) + self.positions.nbytes
