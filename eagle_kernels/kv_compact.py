"""Triton KV-cache compaction: every layer, K and V, every sequence, in one launch.

The path for installs without the compiled CUDA extension (and, under ``TRITON_INTERPRET=1``, for CPU tests).
Contract: :func:`eagle_kernels.reference.kv_compact`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements staged per program and column tile: all accepted rows of a tile are held at once.
_MAX_TILE_ELEMENTS = 8192


@triton.jit(do_not_specialize=["batch", "kv_heads", "max_len", "num_src"])
def _kv_compact_kernel(
    cache_ptr,
    lengths_ptr,
    src_ptr,
    counts_ptr,
    batch,
    kv_heads,
    max_len,
    head_dim,
    num_src,
    MAX_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (layer, K/V, batch, kv head) slab of max_len rows.
    slab = tl.program_id(0).to(tl.int64)
    b = (slab // kv_heads) % batch
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + b), 0), num_src)
    base = tl.load(lengths_ptr + b).to(tl.int64)
    rows = tl.arange(0, MAX_ROWS)
    row_valid = rows < count
    src_rows = base + tl.load(src_ptr + b * num_src + rows, mask=row_valid, other=0).to(tl.int64)
    src_rows = tl.minimum(tl.maximum(src_rows, 0), max_len - 1)  # clamped like the reference
    dst_rows = base + rows
    row_valid = row_valid & (dst_rows < max_len)
    slab_ptr = cache_ptr + slab * max_len * head_dim
    # Columns are independent, so tiling over head_dim keeps "read all rows, then write" overlap-safe.
    for d0 in range(0, head_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_valid[:, None] & (cols < head_dim)[None, :]
        values = tl.load(slab_ptr + src_rows[:, None] * head_dim + cols[None, :], mask=mask)
        # Different threads hold different rows: a barrier keeps every read of this tile before any write.
        tl.debug_barrier()
        tl.store(slab_ptr + dst_rows[:, None] * head_dim + cols[None, :], values, mask=mask)


def launch_config(num_src: int, head_dim: int) -> tuple[int, int]:
    """``(MAX_ROWS, BLOCK_D)`` for ``num_src`` candidate rows of ``head_dim`` elements."""
    max_rows = triton.next_power_of_2(num_src)
    return max_rows, min(triton.next_power_of_2(head_dim), max(16, _MAX_TILE_ELEMENTS // max_rows))


def kv_compact(cache: torch.Tensor, lengths: torch.Tensor, src: torch.Tensor, counts: torch.Tensor) -> None:
    """Move each sequence's accepted tree rows to the front of its tree region, in place, for all layers.

    Parameters
    ----------
    cache : ``[num_layers, 2, B, Hkv, S, D]``, contiguous (any dtype: the kernel copies)
    lengths : int ``[B]``: committed prefix; tree rows start at ``lengths[b]`` (not modified)
    src : int ``[B, N]``: row ``lengths[b] + src[b, i]`` moves to ``lengths[b] + i`` for ``i < counts[b]``
    counts : int ``[B]``, ``0 <= counts[b] <= N``

    Sources and destinations may overlap: each program reads all its accepted rows before writing any.
    """
    if cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"kv_compact: cache must be [L, 2, B, Hkv, S, D], got {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError("kv_compact: cache must be contiguous (it is updated in place)")
    num_layers, _, batch, kv_heads, max_len, head_dim = cache.shape
    if src.dim() != 2 or src.shape[0] != batch or lengths.shape != (batch,) or counts.shape != (batch,):
        raise ValueError(
            f"kv_compact: expected src [{batch}, N], lengths and counts [{batch}], got {tuple(src.shape)}, "
            f"{tuple(lengths.shape)}, {tuple(counts.shape)}"
        )
    num_src = src.shape[1]
    num_slabs = num_layers * 2 * batch * kv_heads
    if num_src == 0 or num_slabs == 0 or head_dim == 0:
        return
    max_rows, block_d = launch_config(num_src, head_dim)
    _kv_compact_kernel[(num_slabs,)](
        cache,
        lengths.to(torch.int32).contiguous(),
        src.to(torch.int64).contiguous(),
        counts.to(torch.int32).contiguous(),
        batch,
        kv_heads,
        max_len,
        head_dim,
        num_src,
        MAX_ROWS=max_rows,
        BLOCK_D=block_d,
    )


__all__ = ["kv_compact", "launch_config"]
