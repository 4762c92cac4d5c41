"""How many KV blocks a runner's pool gets. An engine has one budget of bytes for its runners' pools
(``kv_cache_memory``; by default 90% of the memory free on CUDA when the engine is built, 1 GiB on a CPU);
each runner, when it is built, takes what its ``max_batch_size`` sequences of ``max_model_len`` need, at
most what is left (the first runner is the engine's method's; a vanilla one for ``generate_vanilla`` comes
second)."""

from __future__ import annotations

import logging
import re

import torch

from ..errors import EagleError

log = logging.getLogger(__name__)

CUDA_MEMORY_FRACTION = 0.9  # of the device memory free when the runner is built
CPU_DEFAULT_CAP = 1 << 30  # bytes
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(value) -> int:
    """Bytes from an int or a size string (``"8GiB"``, ``"512MiB"``, ``"2e9"``, ``"1.5GB"``)."""
    bad = EagleError(f"kv_cache_memory must be a number of bytes or a size like '8GiB', got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise bad
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise EagleError(f"kv_cache_memory must be > 0 bytes, got {value!r}")
    return size


def kv_budget(device: torch.device, kv_cache_memory=None) -> int:
    """The bytes an engine's KV pools may take, all runners together: ``kv_cache_memory``; by default
    :data:`CUDA_MEMORY_FRACTION` of the memory free now on CUDA, :data:`CPU_DEFAULT_CAP` on a CPU."""
    if kv_cache_memory is not None:
        return parse_size(kv_cache_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_MEMORY_FRACTION * free)
    return CPU_DEFAULT_CAP


def pool_blocks(bytes_per_block: int, blocks_per_sequence: int, max_batch_size: int, budget: int,
                min_blocks: int = 1) -> int:
    """The blocks of ``bytes_per_block`` (every layer's K and V, the target's and a draft head's) a runner's
    pool gets from ``budget`` bytes: what ``max_batch_size`` sequences of ``max_model_len``
    (``blocks_per_sequence`` each) need, at most the budget. Less than one such sequence is allowed (and
    logged: a request that could never fit is refused when it arrives); less than ``min_blocks`` (what
    the shortest request needs) raises :class:`EagleError`."""
    blocks = min(max_batch_size * blocks_per_sequence, budget // bytes_per_block)
    if blocks < min_blocks:
        raise EagleError(
            f"{budget} bytes of KV cache left hold {blocks} block(s) of {bytes_per_block} bytes; the "
            f"shortest request needs {min_blocks}: give more kv_cache_memory (--kv-cache-memory)"
        )
    if blocks < blocks_per_sequence:
        log.info("the KV cache pool (%d blocks) holds less than one sequence of max_model_len (%d blocks): "
                 "longer requests are refused", blocks, blocks_per_sequence)
    return blocks
