"""Triton's interpreter with bf16 arithmetic as the GPU does it, for the bf16 kernel tests on the CPU.

Triton's interpreter (3.9) keeps bf16 blocks as their uint16 bits: `tl.dot` on bf16 operands multiplies those bits
as integers, and fp32 -> bf16 casts truncate. `faithful_bf16` patches both (operands upcast exactly, casts rounded
to nearest even), so a bf16 kernel run on the CPU rounds where, and as, the compiled kernel does.
"""

import numpy as np
import pytest
import torch


def faithful_bf16(monkeypatch):
    """Patch the interpreter's bf16 dot and fp32 -> bf16 cast for the rest of the test."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not all(hasattr(x, n) for x, n in [(builder, "create_dot"), (builder, "cast_impl"),
                                           (interpreter, "_convert_float"), (interpreter, "TensorHandle")]):
        pytest.skip("this Triton's interpreter has another layout: the bf16 patch does not apply")
    dot, cast = builder.create_dot, builder.cast_impl

    def as_fp32(handle):
        if handle.dtype != tl.bfloat16:
            return handle.data
        return interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype, b.dtype):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(as_fp32(a), as_fp32(b), dtype=d.data.dtype)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).bfloat16().view(torch.int16)
        return interpreter.TensorHandle(rounded.numpy().view(np.uint16), dst_type.scalar)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
