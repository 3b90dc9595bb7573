"""The decoding step a benchmark times: `eager` is the model's own `step`; `compile` and `onnx` come from
momctl.export when this build has them.

This is the one place that knows the backends: momctl.export is expected to offer
`decode_step(model, backend) -> step(ids [B], state) -> (logits [B, W], state)`; until it does, asking for another
backend than eager is a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import MomctlError
from .models import Subject

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


def check_backend(backend: str) -> None:
    """MomctlError now, before any measurement, when `backend` is not available in this build."""
    if backend != "eager" and _export_decode_step() is None:
        raise MomctlError(f"--backend {backend} is not available in this build (momctl.export has no decode_step); "
                          "use --backend eager")


def step_function(subject: Subject, backend: str) -> StepFn:
    """The step of `subject` under `backend`; MomctlError when this build has no such backend."""
    assert subject.step is not None, "decoding needs a model-scope subject"
    if backend == "eager":
        return subject.step
    check_backend(backend)
    return _export_decode_step()(subject.module, backend)


def _export_decode_step():
    try:
        from .. import export
    except ImportError:
        return None
    return getattr(export, "decode_step", None)
