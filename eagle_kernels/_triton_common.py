"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Hopper (sm_90) shared memory: 228 KiB per SM, of which the runtime reserves 1 KiB per resident block; one
# block may use 227 KiB. Two blocks share an SM when each uses at most (228 - 2 x 1) / 2 KiB.
HOPPER_MAX_SHARED = 227 * 1024
HOPPER_TWO_BLOCKS_SHARED = (228 * 1024 - 2 * 1024) // 2


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built for Triton's interpreter (``TRITON_INTERPRET=1`` at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def interpreter_needs_fp32_dot(kernel, dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast: bf16 in the interpreter (never on a GPU)."""
    return dtype == torch.bfloat16 and interpreted(kernel)


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``FP32_DOT`` upcasts the operands (only for Triton's interpreter,
    whose ``tl.dot`` multiplies the raw bits of bf16 operands)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")
