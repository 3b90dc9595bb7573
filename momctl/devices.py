"""Turning a --device option into a torch.device, with a clear error when it cannot be used."""

import torch

from .errors import MomctlError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MomctlError(f"--device {name} was requested but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise MomctlError(f"--device {name!r} is not a device torch knows ({err}); use cpu, cuda or cuda:N") from None
