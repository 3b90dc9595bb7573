"""The autotune hooks that put in-place-updated kernel arguments back after each timed config."""

import torch

from momctl.kernels.common.launch import _restoring


def test_restoring_puts_tensors_back_and_skips_none():
    hooks = _restoring(("dq", "dw"))
    nargs = {"dq": torch.ones(3), "dw": None, "other": torch.zeros(2)}
    for _ in range(2):  # every timed config starts from the same values
        hooks["pre_hook"](nargs)
        nargs["dq"] += 5  # an accumulating kernel run
        nargs["other"] += 1
        hooks["post_hook"](nargs, exception=None)
        assert torch.equal(nargs["dq"], torch.ones(3))
    assert torch.equal(nargs["other"], torch.full((2,), 2.0))  # not named: left as the kernel wrote it
    hooks["pre_hook"](nargs, reset_only=True)  # after tuning, the real run must not be undone
    nargs["dq"] += 5
    hooks["post_hook"](nargs, exception=None)
    assert torch.equal(nargs["dq"], torch.full((3,), 6.0))
