"""Triton top-p (nucleus) threshold: the cut of each row found without sorting it and without a temporary of
the row's size. Contract: :func:`eagle_kernels.reference.top_p_threshold`.

One program per row. A first pass takes the row's maximum ``m`` and ``Z = sum exp(x - m)`` over the entries
``>= floor``. The threshold is then found digit by digit, as a radix select does, on the order-preserving
32-bit key of each float: eight passes of 4 bits each, every pass measuring in registers the mass above 15
candidate keys (``sum exp(x - m)`` over entries whose key is at least the candidate) and keeping the
largest candidate whose mass still reaches ``top_p * Z``. After the last pass the key is exact: the largest
entry value whose mass reaches ``top_p``, ties kept. Nine reads of the row, nothing written but the threshold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import masked_row_max_and_sum, rows_of

BLOCK_V = 1024
NUM_WARPS = 4


@triton.jit
def _order_key(x):
    """The unsigned 32-bit key (in int64) that orders fp32 values: negative floats bit-flipped, the others
    with the sign bit set."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    unsigned = bits & 0xFFFFFFFF
    return tl.where(bits < 0, 0xFFFFFFFF - unsigned, unsigned + 0x80000000)


@triton.jit(do_not_specialize=["T", "V", "stride_b", "stride_t"])
def _top_p_threshold_kernel(
    x_ptr, top_p_ptr, floor_ptr, out_ptr,
    T, V, stride_b, stride_t,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + (r // T) * stride_b + (r % T) * stride_t
    floor = tl.load(floor_ptr + r)
    target_p = tl.load(top_p_ptr + r)
    # The maximum and the sum of exp(x - max) over the entries >= floor.
    m, z = masked_row_max_and_sum(row_ptr, V, floor, BLOCK_V)
    offs = tl.arange(0, BLOCK_V)
    target = target_p * z

    # Radix select on the key, 4 bits a pass: keep the largest candidate whose mass above reaches the target.
    prefix = tl.zeros([], dtype=tl.int64)
    digits = tl.arange(0, 16)
    step = tl.full([], 1 << 28, dtype=tl.int64)  # a digit of this pass, in key units (keys reach 2^32)
    for _ in tl.static_range(8):
        mass = tl.zeros([16], dtype=tl.float32)  # mass[d]: entries with key >= prefix + d * step
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
            e = tl.where((cols < V) & (x >= floor), tl.exp(x - m), 0.0)
            key = _order_key(x)
            for d in tl.static_range(1, 16):
                above = tl.sum(tl.where(key >= prefix + d * step, e, 0.0), 0)
                mass = tl.where(digits == d, mass + above, mass)
        chosen = tl.max(tl.where((digits > 0) & (mass >= target), digits, 0), 0)
        prefix = prefix + chosen.to(tl.int64) * step
        step = step // 16

    # Rounding may make the target 0 (top_p below fp32's range: every candidate reaches it) or leave no
    # candidate reaching it (top_p within an ulp of 1): the cut stays within the row's own keys, the largest
    # one (keep the top) or none at all (keep every entry >= floor).
    nothing_reached = prefix == 0
    prefix = tl.minimum(prefix, _order_key(m))
    # The key back to its float: the threshold.
    bits = tl.where(prefix >= 0x80000000, prefix - 0x80000000, 0xFFFFFFFF - prefix)
    bits = tl.where(bits >= 0x80000000, bits - 0x100000000, bits).to(tl.int32)
    threshold = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + r, tl.where((target_p >= 1.0) | nothing_reached, floor, threshold))


def top_p_threshold(logits, top_p, floor):
    """The top-p cut of each row as a threshold on its logits (see the module).

    Parameters
    ----------
    logits : fp32 ``[..., V]`` (at most 3 dims, contiguous last dim; not modified)
    top_p, floor : fp32 ``logits.shape[:-1]``

    Returns
    -------
    fp32 ``logits.shape[:-1]``: keep ``logits >= threshold``. One launch, no host synchronisation.
    """
    if logits.dtype != torch.float32:
        raise ValueError(f"top_p_threshold needs fp32 logits, got {logits.dtype}")
    rows_shape = logits.shape[:-1]
    if top_p.shape != rows_shape or floor.shape != rows_shape:
        raise ValueError(f"top_p and floor must be {tuple(rows_shape)}, got {tuple(top_p.shape)}, "
                         f"{tuple(floor.shape)}")
    out = torch.empty(rows_shape, dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    x3, t, stride_b, stride_t = rows_of(logits)
    _top_p_threshold_kernel[(out.numel(),)](
        x3, top_p.float().contiguous(), floor.float().contiguous(), out, t, logits.shape[-1], stride_b,
        stride_t, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS, num_stages=1,
    )
    return out


__all__ = ["top_p_threshold"]
