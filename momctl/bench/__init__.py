"""`momctl bench`: throughput and memory sweeps of MoM against its baselines (and FLA's reference, when installed)."""

from .run import CELL_FIELDS, SCHEMA, STATUSES, new_document, run_bench
from .settings import BenchSettings, resolve_settings

__all__ = ["CELL_FIELDS", "SCHEMA", "STATUSES", "BenchSettings", "new_document", "resolve_settings", "run_bench"]
