"""Recurrence kernels of momctl (installed as momctl.kernels)."""
