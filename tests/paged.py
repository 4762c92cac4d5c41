"""Paged KV caches for the kernel tests: a contiguous cache's logical rows laid out in a pool of shuffled
blocks through a block table (the layout of vLLM, SGLang and FlashInfer; see ``eagle_kernels/reference.py``),
and back."""

from __future__ import annotations

import torch

# pool [num_blocks, Hkv, block_size, D], or a [num_blocks, block_size, Hkv, D] one passed permuted
LAYOUTS = ("HND", "NHD")
GARBAGE_ENTRY = 1 << 30  # a table entry past a sequence's used blocks: never dereferenced


def paginate(cache: torch.Tensor, used, block_size: int, layout: str = "HND", spare: int = 3,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The logical rows ``< used[b]`` of a contiguous cache ``[..., B, Hkv, S, D]`` in a pool of shuffled
    blocks.

    Returns ``(pool, block_table)``: ``pool`` ``[..., num_blocks, Hkv, block_size, D]`` (for ``"NHD"``, the
    permuted view of a ``[..., num_blocks, block_size, Hkv, D]`` tensor), ``block_table`` int32
    ``[B, ceil(S / block_size)]``. Sequence ``b``'s first ``ceil(used[b] / block_size)`` logical blocks get
    distinct physical blocks in random order; ``spare`` blocks stay unused. Every row that holds no logical
    row ``< used[b]`` (the rest of a partial last block, the spare blocks) is NaN, and the table entries past
    a sequence's used blocks alternate ``-1`` and ``GARBAGE_ENTRY``: none of it may reach a result.
    """
    *lead, batch, hkv, seq_len, d = cache.shape
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-seq_len // block_size)
    need = [-(-int(u) // block_size) for u in used]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.empty(batch, max_blocks, dtype=torch.int32)
    start = 0
    for b in range(batch):
        table[b, : need[b]] = perm[start : start + need[b]].to(torch.int32)
        start += need[b]
        for j in range(need[b], max_blocks):
            table[b, j] = -1 if j % 2 else GARBAGE_ENTRY
    if layout == "HND":
        pool = torch.full((*lead, num_blocks, hkv, block_size, d), float("nan"), dtype=cache.dtype)
    else:
        pool = torch.full((*lead, num_blocks, block_size, hkv, d), float("nan"), dtype=cache.dtype)
        pool = pool.transpose(-3, -2)
    for b in range(batch):
        for j in range(need[b]):
            lo, hi = j * block_size, min((j + 1) * block_size, int(used[b]))
            pool[..., int(table[b, j]), :, : hi - lo, :] = cache[..., b, :, lo:hi, :]
    return pool.to(cache.device), table.to(cache.device)


def unpaginate(pool: torch.Tensor, block_table: torch.Tensor, used, seq_len: int) -> torch.Tensor:
    """Inverse of :func:`paginate`: ``[..., B, Hkv, seq_len, D]`` with each sequence's logical rows
    ``< used[b]`` read through the table and NaN elsewhere."""
    *lead, _, hkv, block_size, d = pool.shape
    batch = block_table.shape[0]
    out = torch.full((*lead, batch, hkv, seq_len, d), float("nan"), dtype=pool.dtype)
    pool, table = pool.cpu(), block_table.cpu()
    for b in range(batch):
        for r in range(int(used[b])):
            out[..., b, :, r, :] = pool[..., int(table[b, r // block_size]), :, r % block_size, :]
    return out


def unused_rows(pool: torch.Tensor, block_table: torch.Tensor, used) -> torch.Tensor:
    """bool over the pool's ``[..., num_blocks, Hkv, block_size, D]``: the rows no logical row ``< used[b]``
    lives in."""
    *lead, num_blocks, hkv, block_size, d = pool.shape
    free = torch.ones(num_blocks, block_size, dtype=torch.bool)
    table = block_table.cpu()
    for b in range(table.shape[0]):
        for r in range(int(used[b])):
            free[int(table[b, r // block_size]), r % block_size] = False
    return free.view(num_blocks, 1, block_size, 1).expand(*lead, num_blocks, hkv, block_size, d)
