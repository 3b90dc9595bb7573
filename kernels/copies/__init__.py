"""Sums over the routed copies of each token (mixing and its backward, gathered rows' gradients).

`naive.py` holds the pure-PyTorch references; `copies.py` the Triton kernels (import it from its module: it needs
Triton).
"""

from .naive import mix_copies_bwd_ref, sum_copies_ref

__all__ = ["mix_copies_bwd_ref", "sum_copies_ref"]
