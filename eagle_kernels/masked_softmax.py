"""Triton masked softmax, in place: each row becomes the softmax over its entries at or above a threshold
(the top-k / top-p cut), zeros elsewhere. Contract: :func:`eagle_kernels.reference.masked_softmax_`.

One program per row: an online pass for the maximum and the normaliser, a second that writes the
probabilities over the logits. No temporary of the row's size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import masked_row_max_and_sum, rows_of

BLOCK_V = 1024
NUM_WARPS = 4


@triton.jit(do_not_specialize=["T", "V", "stride_b", "stride_t"])
def _masked_softmax_kernel(
    x_ptr, thr_ptr,
    T, V, stride_b, stride_t,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + (r // T) * stride_b + (r % T) * stride_t
    threshold = tl.load(thr_ptr + r)
    m, z = masked_row_max_and_sum(row_ptr, V, threshold, BLOCK_V)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
        tl.store(row_ptr + cols, tl.where(x >= threshold, tl.exp(x - m) / z, 0.0), mask=cols < V)


def masked_softmax_(logits, threshold):
    """In place: each row of ``logits`` becomes the softmax over its entries ``>= threshold``, 0 elsewhere.

    Parameters
    ----------
    logits : fp32 ``[..., V]`` (at most 3 dims, contiguous last dim), updated in place
    threshold : fp32 ``logits.shape[:-1]``, at most each row's maximum (``-inf``: a plain softmax)

    Returns
    -------
    ``logits``. One launch, no host synchronisation.
    """
    if logits.dtype != torch.float32:
        raise ValueError(f"masked_softmax_ needs fp32 logits, got {logits.dtype}")
    if threshold.shape != logits.shape[:-1]:
        raise ValueError(f"threshold must be {tuple(logits.shape[:-1])}, got {tuple(threshold.shape)}")
    rows = threshold.numel()
    if rows == 0 or logits.shape[-1] == 0:
        return logits
    x3, t, stride_b, stride_t = rows_of(logits)
    _masked_softmax_kernel[(rows,)](
        x3, threshold.float().contiguous(), t, logits.shape[-1], stride_b, stride_t,
        BLOCK_V=BLOCK_V, num_warps=NUM_WARPS, num_stages=1,
    )
    return logits


__all__ = ["masked_softmax_"]
