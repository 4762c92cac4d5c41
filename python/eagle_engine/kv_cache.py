"""One preallocated KV buffer for all layers, with per-sequence lengths kept on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """``data``: ``[num_layers, 2, B, Hkv, capacity, D]`` (K at index 0, V at 1); ``lengths``: int32 ``[B]``,
    the committed rows of each sequence. A round's tree rows sit at ``lengths[b] ..`` until compacted."""

    data: torch.Tensor
    lengths: torch.Tensor

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
    ) -> "KVCache":
        data = torch.zeros(num_layers, 2, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        return cls(data, torch.zeros(batch, dtype=torch.int32, device=device))

    def slots(self, start: int, stop: int) -> "KVCache":
        """A view of sequences ``start .. stop - 1`` (data and lengths share this cache's memory)."""
        return KVCache(self.data[:, :, start:stop], self.lengths[start:stop])

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    @property
    def batch_size(self) -> int:
        return self.data.shape[2]
