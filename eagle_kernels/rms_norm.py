"""Triton RMSNorm and residual-add + RMSNorm.

One program per row, two passes over ``H`` in ``BLOCK_H`` chunks (sum of squares, then normalise); the
numerics follow the reference (normalised value rounded to the input dtype before the weight multiply; the
residual sum rounded to the input dtype before its statistics). Contracts:
:func:`eagle_kernels.reference.rms_norm`, :func:`eagle_kernels.reference.add_rms_norm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# name -> (BLOCK_H, num_warps); "small" for H <= 1024.
RMS_CONFIGS = {
    "small": (1024, 4),
    "large": (4096, 8),
}


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    H, eps,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    io_dtype = x_ptr.dtype.element_ty
    sumsq = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + offs
        ok = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            x = (x + r).to(io_dtype).to(tl.float32)  # h = x + residual, in the input dtype
            tl.store(sum_ptr + row * stride_s + cols, x.to(sum_ptr.dtype.element_ty), mask=ok)
        sumsq += x * x
    rstd = tl.math.rsqrt(tl.sum(sumsq, 0) / H + eps)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + offs
        ok = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            x = (x + r).to(io_dtype).to(tl.float32)
        normed = (x * rstd).to(io_dtype).to(tl.float32)  # the reference rounds before the weight multiply
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_config_name(hidden: int) -> str:
    return "small" if hidden <= RMS_CONFIGS["small"][0] else "large"


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms(x2, r2, weight, out, h_out, eps):
    rows, hidden = x2.shape
    if rows == 0:
        return
    block_h, num_warps = RMS_CONFIGS[rms_config_name(hidden)]
    has_res = r2 is not None
    r2 = r2 if has_res else x2
    h_out = h_out if has_res else out
    _rms_norm_kernel[(rows,)](
        x2, r2, weight.contiguous(), out, h_out, hidden, float(eps),
        x2.stride(0), r2.stride(0), out.stride(0), h_out.stride(0),
        HAS_RESIDUAL=has_res, BLOCK_H=block_h, num_warps=num_warps, num_stages=1,
    )


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim, ``x / sqrt(mean(x^2) + eps) * weight`` (fp32 statistics).

    Parameters
    ----------
    x : ``[..., H]`` fp16, bf16 or fp32; weight : ``[H]``; eps : float

    Returns
    -------
    ``[..., H]`` in ``x.dtype`` (the normalised value is rounded to ``x.dtype`` before the weight multiply, as
    Hugging Face's Llama does).
    """
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms(x2, None, weight, out, None, eps)
    return out.view(x.shape)


def add_rms_norm(x, residual, weight, eps):
    """Residual add fused with RMSNorm: ``h = x + residual`` (in ``x.dtype``); returns ``(rms_norm(h), h)``.

    Parameters
    ----------
    x, residual : ``[..., H]`` of one dtype; weight : ``[H]``; eps : float

    Returns
    -------
    ``(normed, h)``, both ``[..., H]`` in ``x.dtype``.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("x and residual must share shape and dtype")
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms(x2, r2, weight, out, h, eps)
    return out.view(x.shape), h.view(x.shape)


__all__ = ["rms_norm", "add_rms_norm"]
