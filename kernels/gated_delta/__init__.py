"""Gated delta rule (and delta rule) recurrences."""

from .naive import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

__all__ = ["chunk_gated_delta_rule_ref", "recurrent_gated_delta_rule_ref"]
