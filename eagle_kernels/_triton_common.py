"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built for Triton's interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


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


def aot_signature(kernel, constexprs: dict, types: dict) -> dict:
    """Triton signature for AOT compilation: ``types`` by argument name, ``i32`` for other scalars."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}


def aot_variant(kernel, constexprs, types, num_warps, num_stages) -> dict:
    """One launch variant for the AOT compile test (``kernel, signature, constexprs, num_warps,
    num_stages``)."""
    return dict(kernel=kernel, constexprs=constexprs, signature=aot_signature(kernel, constexprs, types),
                num_warps=num_warps, num_stages=num_stages)
