"""Triton counter-based uniform random numbers (SplitMix64): no ``torch.Generator``, no state on the device.

Element ``(b, i)`` depends only on ``seeds[b]``, ``offsets[b]`` and ``i``, so a sampling step inside a CUDA
graph draws fresh numbers by advancing ``offsets`` (a tensor), and a seed reproduces a run on any device.
Contract: :func:`eagle_kernels.reference.counter_uniform`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 1024
NUM_WARPS = 4


@triton.jit(do_not_specialize=["n", "stride_o"])
def _counter_uniform_kernel(
    seed_ptr, offset_ptr, out_ptr,
    n, stride_o,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = i < n
    seed = tl.load(seed_ptr + b).to(tl.int64).to(tl.uint64, bitcast=True)
    offset = tl.load(offset_ptr + b).to(tl.int64).to(tl.uint64, bitcast=True)
    counter = offset + i.to(tl.uint64, bitcast=True) + 1
    z = seed + counter * 0x9E3779B97F4A7C15  # all uint64 arithmetic wraps mod 2^64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    u = (z >> 40).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: the top 24 bits, exact in fp32
    tl.store(out_ptr + b * stride_o + i, u, mask=ok)


def counter_uniform(seeds, offsets, n):
    """Counter-based uniforms in ``[0, 1)``: SplitMix64 of ``seeds[b] + (offsets[b] + i + 1) * gamma``.

    Parameters
    ----------
    seeds : int64 ``[B]`` (any value, negative ones as their two's-complement bits)
    offsets : int64 ``[B]``: the counter position of each row's first draw
    n : draws per row

    Returns
    -------
    fp32 ``[B, n]``, contiguous: the top 24 bits of each SplitMix64 output times ``2^-24``.
    """
    if seeds.dim() != 1 or offsets.shape != seeds.shape:
        raise ValueError(f"seeds and offsets must be [B], got {tuple(seeds.shape)}, {tuple(offsets.shape)}")
    if seeds.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError("seeds and offsets must be int64")
    n = int(n)
    out = torch.empty((seeds.shape[0], n), dtype=torch.float32, device=seeds.device)
    if out.numel() == 0:
        return out
    _counter_uniform_kernel[(seeds.shape[0], triton.cdiv(n, BLOCK_N))](
        seeds, offsets, out, n, out.stride(0), BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=1,
    )
    return out


__all__ = ["counter_uniform"]
