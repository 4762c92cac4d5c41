"""Triton KV-cache compaction: every layer, K and V, every sequence, in one launch.

The path for installs without the compiled CUDA extension, for paged or strided caches (the CUDA op takes
the engine's contiguous buffer only), and, under ``TRITON_INTERPRET=1``, for CPU tests. The cache is
``[num_layers, 2, num_blocks, Hkv, block_size, D]`` (any strides, last dim contiguous) read and written
through a block table, or without one ``[num_layers, 2, B, Hkv, S, D]``: ``B`` blocks of ``S`` rows and the
identity table (``PAGED`` is a constexpr; that variant loads no table).
Contract: :func:`eagle_kernels.reference.kv_compact`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements staged per program and column tile: all accepted rows of a tile are held at once.
_MAX_TILE_ELEMENTS = 8192


@triton.jit(do_not_specialize=["batch", "kv_heads", "capacity", "num_src", "block_size", "stride_tab"])
def _kv_compact_kernel(
    cache_ptr,
    lengths_ptr,
    src_ptr,
    counts_ptr,
    tab_ptr,
    batch,
    kv_heads,
    capacity,  # logical rows per sequence: S, or max_blocks * block_size
    head_dim,
    num_src,
    block_size,
    stride_tab,
    stride_layer,
    stride_kv,
    stride_blk,
    stride_head,
    stride_row,
    MAX_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
):
    # One program per (layer, K/V, sequence, kv head): all rows that sequence moves in that head.
    pid = tl.program_id(0).to(tl.int64)
    hk = pid % kv_heads
    b = (pid // kv_heads) % batch
    layer_kv = pid // (kv_heads * batch)  # layer * 2 + (0: K, 1: V)
    head_ptr = cache_ptr + (layer_kv // 2) * stride_layer + (layer_kv % 2) * stride_kv + hk * stride_head
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + b), 0), num_src)
    base = tl.load(lengths_ptr + b).to(tl.int64)
    rows = tl.arange(0, MAX_ROWS)
    row_valid = rows < count
    src_rows = base + tl.load(src_ptr + b * num_src + rows, mask=row_valid, other=0).to(tl.int64)
    src_rows = tl.minimum(tl.maximum(src_rows, 0), capacity - 1)  # clamped like the reference
    dst_rows = base + rows
    row_valid = row_valid & (dst_rows < capacity)
    if PAGED:  # physical (block, row) through the table; a negative destination entry skips the move
        tab_row = tab_ptr + b * stride_tab
        src_blk = tl.load(tab_row + src_rows // block_size, mask=row_valid, other=0).to(tl.int64)
        dst_blk = tl.load(tab_row + dst_rows // block_size, mask=row_valid, other=-1).to(tl.int64)
        row_valid = row_valid & (dst_blk >= 0)
        src_off = tl.maximum(src_blk, 0) * stride_blk + (src_rows % block_size) * stride_row
        dst_off = dst_blk * stride_blk + (dst_rows % block_size) * stride_row
    else:  # the identity table: block b, row r
        src_off = b * stride_blk + src_rows * stride_row
        dst_off = b * stride_blk + dst_rows * stride_row
    # Columns are independent, so tiling over head_dim keeps "read all rows, then write" overlap-safe.
    for d0 in range(0, head_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_valid[:, None] & (cols < head_dim)[None, :]
        values = tl.load(head_ptr + src_off[:, None] + cols[None, :], mask=mask)
        # Different threads hold different rows: a barrier keeps every read of this tile before any write.
        tl.debug_barrier()
        tl.store(head_ptr + dst_off[:, None] + cols[None, :], values, mask=mask)


def launch_config(num_src: int, head_dim: int) -> tuple[int, int]:
    """``(MAX_ROWS, BLOCK_D)`` for ``num_src`` candidate rows of ``head_dim`` elements."""
    max_rows = triton.next_power_of_2(num_src)
    return max_rows, min(triton.next_power_of_2(head_dim), max(16, _MAX_TILE_ELEMENTS // max_rows))


def kv_compact(cache: torch.Tensor, lengths: torch.Tensor, src: torch.Tensor, counts: torch.Tensor,
               block_table: torch.Tensor | None = None) -> None:
    """Move each sequence's accepted tree rows to the front of its tree region, in place, for all layers.

    Parameters
    ----------
    cache : any dtype (the kernel copies), any strides with a contiguous last dim: with ``block_table``,
        the pools of every layer ``[num_layers, 2, num_blocks, Hkv, block_size, D]`` (a
        ``[num_layers, 2, num_blocks, block_size, Hkv, D]`` buffer as ``cache.permute(0, 1, 2, 4, 3, 5)``);
        without, ``[num_layers, 2, B, Hkv, S, D]``
    lengths : int ``[B]``: committed prefix; tree rows start at logical row ``lengths[b]`` (not modified)
    src : int ``[B, N]``: logical row ``lengths[b] + src[b, i]`` moves to ``lengths[b] + i`` for
        ``i < counts[b]``
    counts : int ``[B]``, ``0 <= counts[b] <= N``
    block_table : int32 ``[B, max_blocks]`` or ``None``: logical row ``r`` of sequence ``b`` is row
        ``r % block_size`` of block ``block_table[b, r // block_size]``; ``None``: the identity table

    Sources and destinations may overlap: each program reads all its accepted rows before writing any.
    """
    if cache.dim() != 6 or cache.shape[1] != 2:
        shape = "[L, 2, B, Hkv, S, D]" if block_table is None else "[L, 2, num_blocks, Hkv, block_size, D]"
        raise ValueError(f"kv_compact: cache must be {shape}, got {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError("kv_compact: cache needs a contiguous last dim (it is updated in place)")
    num_layers, _, num_blocks, kv_heads, block_size, head_dim = cache.shape
    paged = block_table is not None
    if paged and (block_table.dim() != 2 or block_table.dtype.is_floating_point):
        raise ValueError(f"kv_compact: block_table must be int32 [B, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    batch = block_table.shape[0] if paged else num_blocks
    if src.dim() != 2 or src.shape[0] != batch or lengths.shape != (batch,) or counts.shape != (batch,):
        raise ValueError(
            f"kv_compact: expected src [{batch}, N], lengths and counts [{batch}], got {tuple(src.shape)}, "
            f"{tuple(lengths.shape)}, {tuple(counts.shape)}"
        )
    num_src = src.shape[1]
    num_programs = num_layers * 2 * batch * kv_heads
    if num_src == 0 or num_programs == 0 or head_dim == 0:
        return
    lengths = lengths.to(torch.int32).contiguous()
    if paged:
        table = block_table.to(torch.int32).contiguous()
        capacity, stride_tab = table.shape[1] * block_size, table.stride(0)
    else:
        table, capacity, stride_tab = lengths, block_size, 0  # unused pointer: the identity table
    max_rows, block_d = launch_config(num_src, head_dim)
    _kv_compact_kernel[(num_programs,)](
        cache,
        lengths,
        src.to(torch.int64).contiguous(),
        counts.to(torch.int32).contiguous(),
        table,
        batch,
        kv_heads,
        capacity,
        head_dim,
        num_src,
        block_size,
        stride_tab,
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        cache.stride(4),
        MAX_ROWS=max_rows,
        BLOCK_D=block_d,
        PAGED=paged,
    )


__all__ = ["kv_compact", "launch_config"]
