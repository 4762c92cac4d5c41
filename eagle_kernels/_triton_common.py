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


def aot_variant(kernel, constexprs, types, num_warps, num_stages, divisible=(), max_shared=None) -> dict:
    """One launch variant for the AOT compile test (``kernel, signature, constexprs, num_warps, num_stages,
    divisible``, and ``max_shared`` where the variant must fit a tighter shared-memory budget).

    ``divisible``: the integer arguments, besides every ``stride_*``, that a typical real launch passes as
    multiples of 16 (Triton's JIT then marks them ``tt.divisibility = 16``, as it marks 16-byte aligned
    pointers; see :func:`divisibility_attrs`)."""
    signature = aot_signature(kernel, constexprs, types)
    out = dict(kernel=kernel, constexprs=constexprs, signature=signature, num_warps=num_warps,
               num_stages=num_stages, divisible=typical_divisible(kernel, signature, divisible))
    if max_shared is not None:
        out["max_shared"] = max_shared
    return out


def typical_divisible(kernel, signature: dict, extra=()) -> list:
    """Integer arguments marked divisible by 16 in a typical launch: every ``stride_*`` and ``extra``."""
    ints = [n for n in kernel.arg_names if signature[n] in ("i32", "i64")]
    return [n for n in ints if n.startswith("stride") or n in extra]


def divisibility_attrs(kernel, signature: dict, divisible) -> dict:
    """``ASTSource(attrs=...)`` with the hints Triton's JIT adds at launch (triton/runtime/jit.py, 3.6): every
    pointer 16-byte aligned and the ``divisible`` integers multiples of 16, as
    ``{(arg_index,): [["tt.divisibility", 16]]}`` (``BaseBackend.parse_attr("D")``)."""
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if signature[name].startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs
