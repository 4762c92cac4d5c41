"""Tensor parallelism over ``torch.distributed`` (Megatron-style sharding of the target model).

One process per device, launched by ``torchrun``; every rank runs the same engine code on its own shard:

- q/k/v and gate/up are column-parallel (each rank holds its heads and its slice of the intermediate size;
  the runner's ``fuse()`` then concatenates this rank's q, k, v slices into one weight);
- o_proj and down_proj are row-parallel: one all-reduce each per layer, the bias added once after it;
- the embedding and lm_head are split over the vocabulary: a masked lookup plus an all-reduce, and an
  all_gather of the logit shards into full logits, so verification and sampling are unchanged;
- each rank's KV cache holds its own kv heads. No collective runs inside a kernel.

Every check (sizes divisible by N, N equal to the world size) needs only the config and the environment, so
each rank raises the same :class:`EagleError` before any collective or allocation: nothing hangs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import EagleError
from .config import ModelConfig

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split over output rows (weight and bias)
ROW = ("o_proj", "down_proj")  # split over input columns (the bias is whole, added after the all-reduce)
VOCAB = ("embed_tokens", "lm_head")  # split over the vocabulary rows


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group of ``size`` ranks."""

    rank: int
    size: int
    group: object = None  # a ProcessGroup; None = the default group

    def part(self, n: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``n`` rows split evenly."""
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step

    def shard_index(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        """The index selecting this rank's part of checkpoint tensor ``name``; None: held whole."""
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if module in COLUMN or module in VOCAB:
            return (slice(*self.part(shape[0])),)
        if module in ROW and parts[-1] == "weight":
            return (slice(None), slice(*self.part(shape[1])))
        return None

    # ---------------------------------------------------------------------------------- collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, -1)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the first dimension (a vocabulary-split weight made whole)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, 0)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t[0])

    def broadcast_ints(self, values: list[int], device: torch.device) -> list[int]:
        """Rank 0's ``values`` on every rank (int64)."""
        t = torch.tensor(values, dtype=torch.long, device=device)
        dist.broadcast(t, src=0, group=self.group)
        return t.tolist()


def check_divisible(cfg: ModelConfig, size: int) -> None:
    """Every split size must divide by ``size``: an :class:`EagleError` naming the field otherwise."""
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        value = getattr(cfg, field)
        if value % size:
            raise EagleError(
                f"tensor_parallel_size {size} does not divide the target's {field} ({value}): "
                f"attention heads, kv heads, intermediate size and vocabulary must all split evenly"
            )


def setup(size: int, cfg: ModelConfig, device: torch.device) -> tuple[TensorParallel | None, torch.device]:
    """Check ``size`` against the config and the launch, join (or initialise, from torchrun's environment)
    the default process group, and return this rank's group and device (``cuda:LOCAL_RANK`` on CUDA).

    ``size == 1``: ``(None, device)``, nothing distributed. Raises :class:`EagleError` before any
    collective when ``size`` does not divide the model or differs from the world size.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise EagleError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
    if size == 1:
        return None, device
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    elif "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    else:
        raise EagleError(
            f"tensor_parallel_size {size} needs one process per rank: launch with "
            f"torchrun --nproc-per-node {size} (or initialise torch.distributed first)"
        )
    if world != size:
        raise EagleError(f"tensor_parallel_size {size} differs from the world size {world} (torchrun ranks)")
    check_divisible(cfg, size)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return TensorParallel(dist.get_rank(), size), device


def shutdown(barrier: bool = True) -> None:
    """Leave the default process group, if one was joined: a barrier first, so that no rank tears its
    connections down while another still uses them (gloo aborts then); ``barrier=False`` when another rank
    is known to be gone (the barrier would wait for it until the group's timeout)."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


# -------------------------------------------------------------------------------- forward pieces


def row_parallel(linear: nn.Linear, x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """``linear(x)`` for a row-parallel ``linear`` (input features split): partial products summed over
    the ranks, then the bias, once."""
    if tp is None:
        return linear(x)
    y = tp.all_reduce(F.linear(x, linear.weight))
    return y if linear.bias is None else y + linear.bias


def vocab_embedding(embed: nn.Embedding, ids: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Rows of a vocabulary-split embedding: each rank looks up its own ids (zeros elsewhere), summed."""
    if tp is None:
        return embed(ids)
    start = tp.rank * embed.num_embeddings
    local = ids - start
    outside = (local < 0) | (local >= embed.num_embeddings)
    x = F.embedding(local.masked_fill(outside, 0), embed.weight)
    return tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """fp32 logits ``[..., V]`` from a (vocabulary-split) output projection: shards gathered in order."""
    logits = F.linear(hidden, weight).float()
    return logits if tp is None else tp.gather_last(logits)


def whole_vocab_weight(weight: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """A vocabulary-split weight gathered whole (``[V, H]``) on every rank; itself without TP."""
    return weight if tp is None else tp.gather_rows(weight)


def count_parameters(module: nn.Module) -> int:
    """Parameter elements this rank holds (each storage counted once: fused views are not double-counted)."""
    seen, total = set(), 0
    for p in module.parameters():
        key = p.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.untyped_storage().nbytes() // p.element_size()
    return total
