"""Grouping tokens into per-(sequence, memory) segments and mixing segment outputs back, with static shapes.

Legend: B batch, T time, S memory slots (E routed + shared), P position within a segment (P = T), C channels.
No host synchronisation: segment lengths stay on the device, and segments are padded to T positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grouping:
    """Segment position p of slot s of sequence b holds token `source_BSP[b, s, p]` when `valid_BSP[b, s, p]`."""

    member_BTS: torch.Tensor  # bool: token t belongs to slot s's segment
    position_BTS: torch.Tensor  # int64: its position in that segment (meaningless where not a member)
    source_BSP: torch.Tensor  # int64: the token at each segment position (0 past the segment's length)
    lengths_BS: torch.Tensor  # int64
    valid_BSP: torch.Tensor  # bool: p < length

    @property
    def lengths_N(self) -> torch.Tensor:
        return self.lengths_BS.reshape(-1)


def group_tokens(member_BTS: torch.Tensor) -> Grouping:
    """Stable grouping: each segment lists its member tokens in increasing time order.

    Args:
        member_BTS: bool `[B, T, S]`, token t of sequence b belongs to slot s.
    """
    B, T, S = member_BTS.shape
    position_BTS = (member_BTS.transpose(1, 2).long().cumsum(-1) - 1).transpose(1, 2)  # inner scan: fast on CUDA
    lengths_BS = member_BTS.sum(1)
    # Non-members write into a spare position T that is dropped.
    dest_BST = torch.where(member_BTS, position_BTS, T).transpose(1, 2)
    tokens_BST = torch.arange(T, device=member_BTS.device).expand(B, S, T)
    source_BSP = torch.zeros(B, S, T + 1, dtype=torch.long, device=member_BTS.device)
    source_BSP = source_BSP.scatter(2, dest_BST, tokens_BST)[:, :, :T]
    valid_BSP = torch.arange(T, device=member_BTS.device) < lengths_BS[..., None]
    return Grouping(member_BTS, position_BTS, source_BSP, lengths_BS, valid_BSP)


def gather_segments(x_BTC: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """`[B, T, C]` token rows -> `[B, S, P, C]` segment rows (rows past a segment's length are arbitrary)."""
    B, T, C = x_BTC.shape
    S = grouping.source_BSP.shape[1]
    index = grouping.source_BSP.reshape(B, S * T, 1).expand(B, S * T, C)
    return x_BTC.gather(1, index).reshape(B, S, T, C)


def gather_tokens(y_BSPC: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """`[B, S, P, C]` segment rows -> `[B, S, T, C]`: slot s's row for token t (arbitrary where t is not a member)."""
    B, S, P, C = y_BSPC.shape
    position_BST = torch.where(grouping.member_BTS, grouping.position_BTS, 0).transpose(1, 2)
    return y_BSPC.gather(2, position_BST[..., None].expand(B, S, P, C))


def mix_segments(y_BSPC: torch.Tensor, grouping: Grouping, weight_BTS: torch.Tensor) -> torch.Tensor:
    """o_t = sum_s weight[t, s] * (slot s's output at token t) over the slots of token t. Returns `[B, T, C]`."""
    y_BSTC = gather_tokens(y_BSPC, grouping)
    w_BST = torch.where(grouping.member_BTS, weight_BTS, 0).transpose(1, 2).to(y_BSPC.dtype)
    return (y_BSTC * w_BST[..., None]).sum(1)
