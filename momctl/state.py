"""The inference state: `InferenceState` (what prefill reads and writes: fixed size per MoM layer, a KV cache per
attention layer that grows) and `StepState` (what the static step reads and writes: every tensor preallocated).

Legend: B batch, S slots (E routed memories + the shared one), H heads, K key head dim, V value head dim,
W conv width, C conv channels, h key/value heads, L cached positions, d attention head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Static KV caches are allocated and grown in blocks of this many positions.
CACHE_BLOCK = 256


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
    """One attention layer's KV cache: keys/values `[B, h, L, d]` and which cached positions are real `[B, L]`."""

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

    @property
    def cache_length(self) -> int:
        """Positions in the longest KV cache (0 without attention layers)."""
        return max((layer.keys.shape[2] for layer in self.layers if isinstance(layer, AttentionState)), default=0)


@dataclass
class KVCache:
    """One attention layer's static KV cache: keys/values `[B, h, L, d]`, L the capacity. Entry p of sequence b holds
    its real token p; entries at or past `positions[b]` are unused (masked)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class StepState:
    """The static step's state: every tensor keeps its shape from step to step, and a step returns new tensors.

    layers: a `MemoryState` per MoM layer (as in `InferenceState`), a `KVCache` per attention layer.
    positions: `[B]` int64, the real tokens each sequence has seen (the next token's position).
    cache_length: a host-side upper bound of `positions` (kept without reading the device), so that the KV caches
        can grow before they are full and be cut back for `to_inference`; 0 for models without attention layers.
    """

    layers: list[MemoryState | KVCache]
    positions: torch.Tensor
    cache_length: int = 0

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held (KV caches at their capacity), all sequences together."""
        return sum(layer.nbytes for layer in self.layers) + self.positions.nbytes

    @property
    def capacity(self) -> int | None:
        """Positions the KV caches can hold (None without attention layers)."""
        lengths = [layer.keys.shape[2] for layer in self.layers if isinstance(layer, KVCache)]
        return min(lengths) if lengths else None

    @classmethod
    def from_inference(cls, state: InferenceState, capacity: int | None = None) -> StepState:
        """The same state for the static step: KV caches compacted (left padding dropped) into `capacity` positions.

        Args:
            state: a prefill's state.
            capacity: KV positions to allocate, at least the longest cache in `state`; default: that length rounded
                up to the next multiple of CACHE_BLOCK with room for one more token.
        """
        kv = [layer for layer in state.layers if isinstance(layer, AttentionState)]
        length = state.cache_length
        if capacity is None:
            capacity = (length // CACHE_BLOCK + 1) * CACHE_BLOCK
        if kv and capacity < length:
            raise ValueError(f"capacity={capacity} is below the {length} cached positions of the state; "
                             f"pass capacity >= {length}")
        layers = [_compact(layer, capacity) if isinstance(layer, AttentionState) else layer for layer in state.layers]
        return cls(layers=layers, positions=state.positions, cache_length=length if kv else 0)

    def to_inference(self) -> InferenceState:
        """The same state for prefill (its KV caches cut to `cache_length` positions, the unused ones marked)."""
        L = self.cache_length
        valid_BL = torch.arange(L, device=self.positions.device) < self.positions[:, None]
        layers = [AttentionState(layer.keys[:, :, :L], layer.values[:, :, :L], valid_BL)
                  if isinstance(layer, KVCache) else layer for layer in self.layers]
        return InferenceState(layers=layers, positions=self.positions)

    def grown(self, capacity: int) -> StepState:
        """A copy whose KV caches hold `capacity` positions (the MoM layers' tensors are shared, not copied)."""
        def grow(x: torch.Tensor) -> torch.Tensor:
            B, h, L, d = x.shape
            return torch.cat([x, x.new_zeros(B, h, capacity - L, d)], dim=2) if capacity > L else x

        layers = [KVCache(grow(layer.keys), grow(layer.values)) if isinstance(layer, KVCache) else layer
                  for layer in self.layers]
        return StepState(layers=layers, positions=self.positions, cache_length=self.cache_length)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, flat: per layer (memory, conv) or (keys, values), then positions."""
        flat = [t for layer in self.layers for t in vars(layer).values()]
        return [*flat, self.positions]

    @property
    def layout(self) -> tuple[type, ...]:
        """The kind of each layer's state (`MemoryState` or `KVCache`): with `tensors()`, all that makes a state."""
        return tuple(type(layer) for layer in self.layers)

    def clone(self) -> StepState:
        """A copy that owns its tensors (to keep a state that a compiled step will advance in place)."""
        return StepState.from_tensors(self.layout, [t.clone() for t in self.tensors()], self.cache_length)

    @classmethod
    def from_tensors(cls, layout: tuple[type, ...], tensors: list[torch.Tensor], cache_length: int) -> StepState:
        """The state of `layout` holding `tensors` (in the order of `tensors()`)."""
        assert len(tensors) == 2 * len(layout) + 1, "one pair of tensors per layer, then positions"
        layers = [kind(tensors[2 * i], tensors[2 * i + 1]) for i, kind in enumerate(layout)]
        return cls(layers=layers, positions=tensors[-1], cache_length=cache_length)

    def where(self, keep_B: torch.Tensor, old: StepState) -> StepState:
        """This state, except the sequences with `keep_B [B]` True, which keep their `old` state."""
        def pick(new_t: torch.Tensor, old_t: torch.Tensor) -> torch.Tensor:
            return torch.where(keep_B.reshape(-1, *[1] * (new_t.dim() - 1)), old_t, new_t)

        tensors = [pick(n, o) for n, o in zip(self.tensors(), old.tensors(), strict=True)]
        return StepState.from_tensors(self.layout, tensors, self.cache_length)


def _compact(cache: AttentionState, capacity: int) -> KVCache:
    """Move each sequence's real cache entries to positions 0, 1, ... of a `[B, h, capacity, d]` cache."""
    B, h, L, d = cache.keys.shape
    # Padding entries go to a spare position `capacity`, dropped after the scatter.
    dest_BL = torch.where(cache.valid, cache.valid.long().cumsum(1) - 1, capacity)
    index = dest_BL[:, None, :, None].expand(B, h, L, d)

    def place(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(B, h, capacity + 1, d).scatter(2, index, x)[:, :, :capacity]

    return KVCache(place(cache.keys), place(cache.values))
