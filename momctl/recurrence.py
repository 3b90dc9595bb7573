"""The memory update behind one function signature, whatever the update rule and implementation.

The pure-PyTorch references come from `momctl.kernels.<family>.naive`: a loop over time (short inputs, decode)
and a chunkwise-parallel form (long inputs).
"""

from __future__ import annotations

import torch

from .backend import use_kernels
from .kernels.gated.naive import chunk_gated_rule_ref, recurrent_gated_rule_ref
from .kernels.gated_delta.naive import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

# Below this many positions the loop over time beats the chunked form on a CPU.
CHUNK_MIN_LENGTH = 16


def memory_update(
    update_rule: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the memory recurrence of `update_rule` with in-kernel q/k L2 norm and scale K**-0.5.

    Args:
        update_rule: `gated_delta` | `delta` (use beta) | `gated` | `linear` (ignore beta).
        q, k: `[N, T, H, K]`; v: `[N, T, H, V]`; beta, g: `[N, T, H]` (g is the log decay; ignored without decay).
        initial_state: `[N, H, K, V]` or None for zeros.
        output_final_state: also return the state after the last position.
        cu_seqlens: `[N+1]` offsets of N segments packed along T (then the batch is 1), or None.

    Our Triton kernels run when `use_kernels` says so (CUDA by default), the references otherwise.
    """
    delta, decay = rule_terms(update_rule, g)
    kwargs = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if use_kernels(q):
        if delta:
            from .kernels.gated_delta.chunk import chunk_gated_delta_rule

            return chunk_gated_delta_rule(q, k, v, beta, decay, **kwargs)
        from .kernels.gated.chunk import chunk_gated_rule

        return chunk_gated_rule(q, k, v, decay, **kwargs)
    chunked = q.shape[1] >= CHUNK_MIN_LENGTH
    if delta:
        fn = chunk_gated_delta_rule_ref if chunked else recurrent_gated_delta_rule_ref
        return fn(q, k, v, beta, decay, **kwargs)
    fn = chunk_gated_rule_ref if chunked else recurrent_gated_rule_ref
    return fn(q, k, v, decay, **kwargs)


def rule_terms(update_rule: str, g: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
    """Whether the rule is a delta rule, and the log decay it uses (None for `delta` and `linear`)."""
    return update_rule in ("gated_delta", "delta"), g if update_rule in ("gated_delta", "gated") else None
