"""Varlen depthwise causal short convolution + SiLU (the MoM layer's q/k/v conv over routed segments).

`naive.short_conv_varlen_ref` is the pure-PyTorch truth; `short_conv.short_conv_varlen` the Triton kernels (import
it from its module: it needs Triton).
"""

from .naive import short_conv_varlen_ref

__all__ = ["short_conv_varlen_ref"]
