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


def rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``x`` ``[..., V]`` (at most 3 dims, contiguous last dim) as ``(x3, T, stride_b, stride_t)``: a
    ``[B, T, V]`` view whose row ``r = b * T + t`` a kernel finds at ``b * stride_b + t * stride_t`` (so a
    slice ``logits[:, :t]`` of a bigger buffer is read in place)."""
    if x.dim() > 3 or x.stride(-1) != 1:
        raise ValueError(f"need [..., V] with at most 3 dims and a contiguous last dim, got {tuple(x.shape)}")
    x3 = x.view(1, 1, -1) if x.dim() == 1 else (x.unsqueeze(0) if x.dim() == 2 else x)
    return x3, x3.shape[1], x3.stride(0), x3.stride(1)


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``FP32_DOT`` upcasts the operands (only for Triton's interpreter,
    whose ``tl.dot`` multiplies the raw bits of bf16 operands)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def masked_row_max_and_sum(row_ptr, V, threshold, BLOCK_V: tl.constexpr):
    """Over the entries ``>= threshold`` of one fp32 row of ``V``: the maximum ``m`` and ``sum exp(x - m)``,
    in one online pass (``-inf`` and 0 where nothing is kept)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    z = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
        keep = (cols < V) & (x >= threshold)
        m_new = tl.maximum(m, tl.max(tl.where(keep, x, float("-inf")), 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while nothing is kept
        z = z * tl.exp(m - m_safe) + tl.sum(tl.where(keep, tl.exp(x - m_safe), 0.0), 0)
        m = m_new
    return m, z
