"""Triton SwiGLU activation ``silu(gate) * up``, reading gate and up straight from a fused gate_up output.

One program per row and ``BLOCK_I`` columns; fp32 inside, stored in the input dtype. Contract:
:func:`eagle_kernels.reference.silu_mul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_I = 1024
NUM_WARPS = 4


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr,
    n_cols, stride_g, stride_u, stride_o,
    BLOCK_I: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = cols < n_cols
    g = tl.load(gate_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, I]`` without a copy where the leading dims collapse (a slice of a fused output)."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:  # leading dims that do not collapse into one stride
            pass
    return x.reshape(-1, x.shape[-1]).contiguous()


def silu_mul(gate, up):
    """SwiGLU activation ``silu(gate) * up``, computed in fp32.

    Parameters
    ----------
    gate, up : ``[..., I]`` fp16, bf16 or fp32, one shape and dtype; may be strided views (e.g. the two halves
        of a fused ``[..., 2I]`` gate_up projection) with a contiguous last dim: they are read in place.

    Returns
    -------
    contiguous ``[..., I]`` in ``gate.dtype``.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if gate.dim() == 0:
        raise ValueError("silu_mul needs at least one dimension")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    inter = gate.shape[-1]
    if out.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    o2 = out.view(-1, inter)
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(inter, BLOCK_I))](
        g2, u2, o2, inter, g2.stride(0), u2.stride(0), o2.stride(0),
        BLOCK_I=BLOCK_I, num_warps=NUM_WARPS, num_stages=1,
    )
    return out


__all__ = ["silu_mul"]
