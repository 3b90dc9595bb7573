"""Gated delta rule (and delta rule) recurrences."""

from .naive import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

__all__ = ["chunk_gated_delta_rule", "chunk_gated_delta_rule_ref", "recurrent_gated_delta_rule_ref"]


def __getattr__(name: str):
    # The Triton kernels load on first use: importing the references must not import triton (CPU-only installs,
    # and tests that set TRITON_INTERPRET=1 before the kernels are decorated).
    if name == "chunk_gated_delta_rule":
        from .chunk import chunk_gated_delta_rule

        return chunk_gated_delta_rule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
