"""KV caches: one pool of fixed-size blocks for all layers, read and written through a block table, with
per-sequence lengths kept on the device.

The layout is the one of vLLM, SGLang and FlashInfer (see ``eagle_kernels/reference.py``): a pool
``[num_layers, 2, num_blocks, Hkv, block_size, D]`` (K at index 0, V at 1) and a block table int32
``[B, max_blocks]``: logical row ``r`` of sequence ``b`` is row ``r % block_size`` of block
``block_table[b, r // block_size]`` (``-1``: none; writes there are dropped). A contiguous cache is the
special case of ``B`` blocks of ``capacity`` rows and the identity table (:meth:`KVCache.allocate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoolShape:
    """A paged pool's geometry, shared by the caches of one runner (a target's and its draft head's: the same
    block ids, the same table): ``num_blocks`` blocks of ``block_size`` rows, addressed through
    ``block_table`` int32 ``[max_batch, max_blocks]``."""

    num_blocks: int
    block_size: int
    block_table: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def kwargs(self) -> dict:
        """:meth:`KVCache.allocate`'s keywords for this pool (its ``capacity`` is this pool's)."""
        return {"num_blocks": self.num_blocks, "block_table": self.block_table}


@dataclass
class KVCache:
    """``data``: the pool ``[num_layers, 2, num_blocks, Hkv, block_size, D]``; ``lengths``: int32 ``[B]``,
    the committed rows of each sequence; ``block_table``: int32 ``[B, max_blocks]``. A round's tree rows sit
    at logical rows ``lengths[b] ..`` until compacted."""

    data: torch.Tensor
    lengths: torch.Tensor
    block_table: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        num_blocks: int | None = None,
        block_table: torch.Tensor | None = None,
    ) -> "KVCache":
        """A zeroed cache for ``batch`` sequences of up to ``capacity`` rows. Without ``num_blocks``: the
        contiguous layout, one block of ``capacity`` rows per sequence and the identity table. With it: a pool
        of ``num_blocks`` blocks of ``capacity // block_table.shape[1]`` rows, addressed through
        ``block_table`` (a table shared by several caches, e.g. a target's and its draft head's)."""
        if num_blocks is None:
            table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
            num_blocks, block_size = batch, capacity
        else:
            table = block_table
            block_size = capacity // table.shape[1]
            if block_size * table.shape[1] != capacity or table.shape[0] != batch:
                raise ValueError(f"{batch} x {capacity} rows do not fit a table {tuple(table.shape)}")
        shape = (num_layers, 2, num_blocks, kv_heads, block_size, head_dim)
        data = torch.zeros(shape, dtype=dtype, device=device)
        return cls(data, torch.zeros(batch, dtype=torch.int32, device=device), table)

    def slots(self, start: int, stop: int) -> "KVCache":
        """Sequences ``start .. stop - 1`` (the same pool; their lengths and table rows, sharing memory)."""
        return KVCache(self.data, self.lengths[start:stop], self.block_table[start:stop])

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_pool, v_pool)`` of layer ``i``, each ``[num_blocks, Hkv, block_size, D]``."""
        return self.data[i, 0], self.data[i, 1]

    def rows(self, b: int, n: int) -> torch.Tensor:
        """Logical rows ``0 .. n - 1`` of sequence ``b`` read through its table row: a copy
        ``[num_layers, 2, Hkv, n, D]`` (for inspection and tests)."""
        blocks = self.block_table[b, : -(-n // self.block_size)].long()
        picked = self.data[:, :, blocks].permute(0, 1, 3, 2, 4, 5)  # [L, 2, Hkv, blocks, block_size, D]
        return picked.flatten(3, 4)[:, :, :, :n]

    @property
    def block_size(self) -> int:
        return self.data.shape[4]

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]

    @property
    def capacity(self) -> int:
        """Rows a sequence can address: ``max_blocks * block_size``."""
        return self.block_table.shape[1] * self.block_size

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]
