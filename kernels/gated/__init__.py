"""Gated linear attention (and linear attention) recurrences."""

from .naive import chunk_gated_rule_ref, recurrent_gated_rule_ref

__all__ = ["chunk_gated_rule_ref", "recurrent_gated_rule_ref"]
