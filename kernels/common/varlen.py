"""The varlen chunk layout every chunkwise kernel shares, built on the device without host synchronisation.

Sequences are packed along one time axis: segment n owns positions `cu_seqlens[n] : cu_seqlens[n+1]` (empty
segments allowed). Each segment is cut into chunks of `chunk_size` positions (the last one may be short); chunks
never cross a segment boundary. The number of chunks depends on the lengths, so tables are sized by the static upper
bound `ceil(T / chunk_size) + N` and unused rows are marked with segment -1: kernels launched over the bound exit
early on those rows. Nothing here reads a device value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    """Where every chunk of a packed batch lives.

    cu_seqlens: int32 `[N+1]` segment offsets into the packed time axis of length `total`.
    chunk_offsets: int32 `[N+1]`, segment n's chunks are global chunks `chunk_offsets[n] : chunk_offsets[n+1]`.
    chunk_indices: int32 `[max_chunks, 2]`, global chunk j is chunk `chunk_indices[j, 1]` of segment
        `chunk_indices[j, 0]`; rows at or past the real number of chunks hold (-1, 0).
    """

    cu_seqlens: torch.Tensor
    chunk_offsets: torch.Tensor
    chunk_indices: torch.Tensor
    total: int
    chunk_size: int

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def max_chunks(self) -> int:
        return self.chunk_indices.shape[0]


def max_chunks(total: int, num_segments: int, chunk_size: int) -> int:
    """Static upper bound on the number of chunks of `num_segments` segments covering `total` positions."""
    return -(-total // chunk_size) + num_segments


def chunk_layout(cu_seqlens: torch.Tensor | None, batch: int, length: int, chunk_size: int,
                 device: torch.device) -> ChunkLayout:
    """The layout of `batch` sequences of `length` positions (cu_seqlens None) or of packed segments.

    With cu_seqlens, `batch` must be 1 and `length` is the packed total.
    """
    if cu_seqlens is None:
        per_seq = -(-length // chunk_size)
        steps = torch.arange(batch + 1, dtype=torch.int32, device=device)
        seg = torch.arange(batch, dtype=torch.int32, device=device).repeat_interleave(per_seq)
        within = torch.arange(per_seq, dtype=torch.int32, device=device).repeat(batch)
        return ChunkLayout(steps * length, steps * per_seq, torch.stack([seg, within], 1), batch * length, chunk_size)
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    total = length
    n = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()
    counts = (lengths + chunk_size - 1) // chunk_size
    offsets = torch.zeros(n + 1, dtype=torch.long, device=device)
    offsets[1:] = counts.cumsum(0)
    j = torch.arange(max_chunks(total, n, chunk_size), device=device)
    seg = torch.searchsorted(offsets[1:], j, right=True)  # first segment whose chunks end after j
    real = seg < n
    seg_c = seg.clamp(max=n - 1)
    within = j - offsets[seg_c]
    indices = torch.stack([torch.where(real, seg_c, -1), torch.where(real, within, 0)], 1).to(torch.int32)
    return ChunkLayout(cu, offsets.to(torch.int32), indices, total, chunk_size)
