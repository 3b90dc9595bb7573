"""Routed token copies packed slot-major along one axis: the layout of the kernel path, with static sizes, no sync.

Legend: B batch, T time, A copies per token (top-k routed + the shared memory), S slots, M = B*T*A copies.

Every token has exactly A copies, so M is static. Copies are sorted by (slot, sequence, time) with a counting
sort (cumulative sums, one scatter), so each (slot, sequence) pair is one contiguous segment in time order and each
slot's rows are contiguous (one group of a grouped GEMM). Segment `s*B + b` holds sequence b's tokens routed to
slot s; a last segment collects the copies of padding tokens, which take no part (mixing weight 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import use_kernels
from .modules import short_conv_varlen, short_conv_varlen_bwd


@dataclass(frozen=True)
class Packing:
    token_of_copy_M: torch.Tensor  # int64: the flat token index (b*T + t) of each packed copy
    slot_of_copy_M: torch.Tensor  # int64: the slot of each packed copy
    copy_of_token_NA: torch.Tensor  # int64 [B*T, A]: where each token's copies sit
    weight_NA: torch.Tensor  # mixing weight of each copy (0 for padding tokens)
    cu_seqlens: torch.Tensor  # int32 [S*B + 2]: segment offsets, the padding segment last
    slot_ends_S: torch.Tensor  # int32 [S]: end row of each slot's group (the last slot's group takes the padding)
    member_BTS: torch.Tensor  # bool: token t of sequence b is routed to slot s (real tokens only)

    @property
    def num_copies(self) -> int:
        return self.token_of_copy_M.shape[0]


def pack_tokens(slots_BTA: torch.Tensor, weight_BTA: torch.Tensor, valid_BT: torch.Tensor, num_slots: int) -> Packing:
    """Pack the copies of every token: token (b, t)'s copy a goes to slot `slots_BTA[b, t, a]` with that weight.

    The slots of one token must be distinct.
    """
    B, T, A = slots_BTA.shape
    S, device = num_slots, slots_BTA.device
    member_BTS = torch.zeros(B, T, S, dtype=torch.bool, device=device).scatter(-1, slots_BTA, True)
    member_BTS = member_BTS & valid_BT[..., None]
    # Scan along the innermost dim: a CUDA scan over dim 1 of [B, T, S] with few columns runs nearly serially.
    position_BTS = (member_BTS.transpose(1, 2).long().cumsum(-1) - 1).transpose(1, 2)
    counts_SB = member_BTS.sum(1).T
    zero, total = counts_SB.new_zeros(1), counts_SB.new_full((1,), B * T * A)  # filled on the device: no copy
    cu = torch.cat([zero, counts_SB.reshape(-1).cumsum(0), total])
    segment_BTA = slots_BTA * B + torch.arange(B, device=device)[:, None, None]
    dest_real = cu[segment_BTA] + position_BTS.gather(-1, slots_BTA)
    # Padding tokens' copies fill the last segment, in token order.
    pad_rank_BT = (~valid_BT).reshape(-1).long().cumsum(0).reshape(B, T) - 1
    dest_pad = cu[S * B] + pad_rank_BT[..., None] * A + torch.arange(A, device=device)
    dest_BTA = torch.where(valid_BT[..., None], dest_real, dest_pad)
    rank_of_copy = torch.empty(B * T * A, dtype=torch.long, device=device).scatter_(
        0, dest_BTA.reshape(-1), torch.arange(B * T * A, device=device))
    token_of_copy = rank_of_copy // A
    slot_of_copy = torch.empty_like(token_of_copy).scatter_(0, dest_BTA.reshape(-1), slots_BTA.reshape(-1))
    slot_ends = torch.cat([cu[torch.arange(1, S, device=device) * B], total])
    weight_NA = torch.where(valid_BT[..., None], weight_BTA, 0).reshape(B * T, A)
    return Packing(token_of_copy, slot_of_copy, dest_BTA.reshape(B * T, A), weight_NA, cu.to(torch.int32),
                   slot_ends.to(torch.int32), member_BTS)


def _copy_sums(x: torch.Tensor):
    """`sum_copies` and `mix_copies_bwd`: the Triton kernels when `use_kernels` says so, else the references."""
    if use_kernels(x):
        from .kernels.copies.copies import mix_copies_bwd, sum_copies
    else:
        from .kernels.copies.naive import mix_copies_bwd_ref as mix_copies_bwd
        from .kernels.copies.naive import sum_copies_ref as sum_copies
    return sum_copies, mix_copies_bwd


class _MixCopies(torch.autograd.Function):
    """o_token = sum over the token's copies of weight * copy output (kernels/copies), and its backward."""

    @staticmethod
    def forward(ctx, y_MC, weight_NA, copy_of_token_NA):
        ctx.save_for_backward(y_MC, weight_NA, copy_of_token_NA)
        sum_copies, _ = _copy_sums(y_MC)
        return sum_copies(y_MC.contiguous(), copy_of_token_NA, weight_NA)

    @staticmethod
    def backward(ctx, d_NC):
        y_MC, weight_NA, copy_of_token_NA = ctx.saved_tensors
        _, mix_copies_bwd = _copy_sums(d_NC)
        d_y, d_w = mix_copies_bwd(d_NC.contiguous(), y_MC.contiguous(), copy_of_token_NA, weight_NA)
        return d_y, d_w.to(weight_NA.dtype), None


def mix_copies(y_MC: torch.Tensor, packing: Packing) -> torch.Tensor:
    """o_token = sum over the token's copies of weight * copy output. Returns `[B*T, C]`."""
    return _MixCopies.apply(y_MC, packing.weight_NA, packing.copy_of_token_NA)


def project_copies(x_ND: torch.Tensor, weight_SND: torch.Tensor, packing: Packing) -> torch.Tensor:
    """`grouped_linear(x_ND[packing.token_of_copy_M], weight_SND, ...)`, without keeping the copies `[M, D]` for the
    backward: the weight gradient gathers them again from the token rows (at 32K tokens and A = 3, that keeps
    192 MiB out of the training step's peak for one more gather)."""
    return _ProjectCopies.apply(x_ND, weight_SND, packing.token_of_copy_M, packing.copy_of_token_NA,
                                packing.slot_ends_S)


def convolve_copies(x_NC: torch.Tensor, weight_CW: torch.Tensor, packing: Packing, cache_NWC: torch.Tensor | None,
                    output_final_cache: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`short_conv_varlen(x_NC[packing.token_of_copy_M], ...)` over the packing's segments, without keeping the copies
    `[M, C]` for the backward, which gathers them again from the token rows (q is projected once per token; at 32K
    tokens and A = 3 that keeps 128 MiB net out of the training step's peak)."""
    cache = cache_NWC if cache_NWC is not None else x_NC.new_empty(0)
    y_MC, new_cache = _ConvolveCopies.apply(x_NC, weight_CW, cache, packing.token_of_copy_M, packing.copy_of_token_NA,
                                            packing.cu_seqlens, output_final_cache)
    return y_MC, new_cache if output_final_cache else None


def convolve_projection(proj_MC: torch.Tensor, weights_CW: list[torch.Tensor], caches_NWC: list[torch.Tensor | None],
                        cu_seqlens: torch.Tensor, output_final_cache: bool
                        ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]]:
    """`short_conv_varlen` over the packing's segments of the projection's leading column groups, one filter
    `weights_CW[i]` `[C_i, W]` and cache each, read in place; and a copy of its remaining columns (the gates).

    Returns the convolved groups `[M, C_i]`, the gates `[M, rest]` and the new caches (None unless
    output_final_cache). The backward writes every group's gradient and the gates' into one buffer shaped like the
    projection: split apart, the projection's gradient would be a concatenation of the pieces' (one more copy of the
    whole `[M, C]` projection; 0.48 ms of the 340M layer's training step on an H100)."""
    n = len(weights_CW)
    outputs = _ConvolveProjection.apply(proj_MC, cu_seqlens, output_final_cache, *weights_CW, *caches_NWC)
    new_caches = outputs[n + 1:] if output_final_cache else [None] * n
    return list(outputs[:n]), outputs[n], list(new_caches)


class _ConvolveProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj_MC, cu_seqlens, output_final_cache, *weights_and_caches):
        n = len(weights_and_caches) // 2
        weights, caches = weights_and_caches[:n], weights_and_caches[n:]
        ctx.save_for_backward(proj_MC, cu_seqlens, *weights, *caches)
        ctx.output_final_cache = output_final_cache
        ys, new_caches, c0 = [], [], 0
        for weight_CW, cache_NWC in zip(weights, caches, strict=True):
            c1 = c0 + weight_CW.shape[0]
            y_MC, new_cache = short_conv_varlen(proj_MC[:, c0:c1], weight_CW, cu_seqlens, cache_NWC, output_final_cache)
            ys.append(y_MC)
            new_caches.append(new_cache if output_final_cache else proj_MC.new_empty(0))
            c0 = c1
        return *ys, proj_MC[:, c0:].contiguous(), *new_caches

    @staticmethod
    def backward(ctx, *grads):
        proj_MC, cu_seqlens, *rest = ctx.saved_tensors
        n = len(rest) // 2
        weights, caches = rest[:n], rest[n:]
        d_ys, d_gates, d_new_caches = grads[:n], grads[n], grads[n + 1:]
        d_proj_MC = torch.empty_like(proj_MC)
        d_weights, d_caches, c0 = [], [], 0
        for i, (weight_CW, cache_NWC, d_y, d_new_cache) in enumerate(zip(weights, caches, d_ys, d_new_caches,
                                                                         strict=True)):
            c1 = c0 + weight_CW.shape[0]
            _, d_weight, d_cache = short_conv_varlen_bwd(
                proj_MC[:, c0:c1], weight_CW, cu_seqlens, cache_NWC, d_y,
                d_new_cache if ctx.output_final_cache else None, ctx.needs_input_grad[3 + n + i], d_proj_MC[:, c0:c1])
            d_weights.append(d_weight)
            d_caches.append(d_cache)
            c0 = c1
        d_proj_MC[:, c0:] = d_gates
        return d_proj_MC, None, None, *d_weights, *d_caches


class _ConvolveCopies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NC, weight_CW, cache, token_of_copy_M, copy_of_token_NA, cu_seqlens, output_final_cache):
        ctx.save_for_backward(x_NC, weight_CW, cache, token_of_copy_M, copy_of_token_NA, cu_seqlens)
        ctx.output_final_cache = output_final_cache
        y_MC, new_cache = short_conv_varlen(x_NC.index_select(0, token_of_copy_M), weight_CW, cu_seqlens,
                                            cache if cache.numel() else None, output_final_cache)
        return y_MC, new_cache if output_final_cache else x_NC.new_empty(0)

    @staticmethod
    def backward(ctx, d_MC, d_cache):
        x_NC, weight_CW, cache, token_of_copy_M, copy_of_token_NA, cu_seqlens = ctx.saved_tensors
        d_x_MC, d_weight, d_cache_in = short_conv_varlen_bwd(
            x_NC.index_select(0, token_of_copy_M), weight_CW, cu_seqlens, cache if cache.numel() else None, d_MC,
            d_cache if ctx.output_final_cache else None, ctx.needs_input_grad[2])
        return _sum_copy_grads(d_x_MC, copy_of_token_NA), d_weight, d_cache_in, None, None, None, None


class _ProjectCopies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_SND, token_of_copy_M, copy_of_token_NA, slot_ends_S):
        ctx.save_for_backward(x_ND, weight_SND, token_of_copy_M, copy_of_token_NA, slot_ends_S)
        ctx.dtype = _grouped_mm_dtype(x_ND)  # autocast is off in the backward: keep the forward's choice
        return grouped_linear(_gather_rows(x_ND, token_of_copy_M, ctx.dtype), weight_SND, slot_ends_S)

    @staticmethod
    def backward(ctx, d_MN):
        x_ND, weight_SND, token_of_copy_M, copy_of_token_NA, slot_ends_S = ctx.saved_tensors
        x_MD = _gather_rows(x_ND, token_of_copy_M, ctx.dtype)
        d_MD, d_SND = grouped_linear_bwd(x_MD, weight_SND, slot_ends_S, d_MN.contiguous(), ctx.dtype)
        del x_MD
        return _sum_copy_grads(d_MD, copy_of_token_NA).to(x_ND.dtype), d_SND.to(weight_SND.dtype), None, None, None


def _sum_copy_grads(d_MC: torch.Tensor, copy_of_token_NA: torch.Tensor) -> torch.Tensor:
    """The gradient of gathered token rows: each token's A copy gradients summed (no atomics: exactly A copies)."""
    sum_copies, _ = _copy_sums(d_MC)
    return sum_copies(d_MC.contiguous(), copy_of_token_NA, None)


def _gather_rows(x_ND: torch.Tensor, rows_M: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`x_ND[rows_M]`, cast first to the grouped GEMM's dtype (if any): under autocast x may be fp32."""
    return (x_ND if dtype is None else x_ND.to(dtype)).index_select(0, rows_M)


def _grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 when one grouped GEMM (`torch._grouped_mm`, CUDA) computes the product of x's rows, else None."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    usable = x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
    return dtype if usable else None


def _pad_to_8(weight_SND: torch.Tensor) -> torch.Tensor:
    """Zero rows up to a multiple of 8 (the grouped GEMM needs 16-byte aligned strides)."""
    S, N, D = weight_SND.shape
    return torch.cat([weight_SND, weight_SND.new_zeros(S, -N % 8, D)], dim=1)


def _slot_of_rows(slot_ends_S: torch.Tensor, M: int, S: int) -> torch.Tensor:
    """The slot of each of the M sorted rows (the reference products' row selection)."""
    rows = torch.arange(M, device=slot_ends_S.device)
    return torch.searchsorted(slot_ends_S.long(), rows, right=True).clamp(max=S - 1)


def _own_slot(y_MSX: torch.Tensor, slot_M: torch.Tensor) -> torch.Tensor:
    """Row m of slot `slot_M[m]` from every slot's product `[M, S, X]`. Returns `[M, X]`."""
    return y_MSX.gather(1, slot_M[:, None, None].expand(-1, 1, y_MSX.shape[-1]))[:, 0]


def grouped_linear(x_MD: torch.Tensor, weight_SND: torch.Tensor, slot_ends_S: torch.Tensor) -> torch.Tensor:
    """Rows `slot_ends[s-1] : slot_ends[s]` of x times slot s's weight `[N, D]`. Returns `[M, N]`.

    CUDA: one grouped GEMM (`torch._grouped_mm`, bf16) over the sorted rows, no padding. Elsewhere: every slot's
    product on every row, then each row keeps its own slot's (S times the work; small CPU runs only).
    """
    N = weight_SND.shape[1]
    dtype = _grouped_mm_dtype(x_MD)
    if dtype is not None:
        if N % 8:
            return grouped_linear(x_MD, _pad_to_8(weight_SND), slot_ends_S)[:, :N]
        return torch._grouped_mm(x_MD.to(dtype), weight_SND.to(dtype).transpose(1, 2), offs=slot_ends_S)
    slot_M = _slot_of_rows(slot_ends_S, x_MD.shape[0], weight_SND.shape[0])
    return _own_slot(torch.einsum("md,snd->msn", x_MD, weight_SND.to(x_MD.dtype)), slot_M)


def grouped_linear_bwd(x_MD: torch.Tensor, weight_SND: torch.Tensor, slot_ends_S: torch.Tensor,
                       d_MN: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `grouped_linear` in x `[M, D]` and weight `[S, N, D]` (a slot without rows gets zeros), given
    the forward's `_grouped_mm_dtype`: two grouped GEMMs in that dtype, or the reference's products over every slot."""
    N = weight_SND.shape[1]
    if dtype is None:
        S = weight_SND.shape[0]
        slot_M = _slot_of_rows(slot_ends_S, x_MD.shape[0], S)
        one_hot_MS = torch.nn.functional.one_hot(slot_M, S).to(x_MD.dtype)
        d_MD = _own_slot(torch.einsum("mn,snd->msd", d_MN, weight_SND.to(x_MD.dtype)), slot_M)
        return d_MD, torch.einsum("ms,mn,md->snd", one_hot_MS, d_MN, x_MD)
    if N % 8:
        d_MN = torch.cat([d_MN, d_MN.new_zeros(d_MN.shape[0], -N % 8)], dim=1)
        d_MD, d_SND = grouped_linear_bwd(x_MD, _pad_to_8(weight_SND), slot_ends_S, d_MN, dtype)
        return d_MD, d_SND[:, :N]
    d_MN = d_MN.to(dtype)
    d_MD = torch._grouped_mm(d_MN, weight_SND.to(dtype), offs=slot_ends_S)
    d_SND = torch._grouped_mm(d_MN.t(), x_MD.to(dtype), offs=slot_ends_S)
    return d_MD, d_SND
