"""Data parallelism for training under ``torchrun``: joining the process group, and what rank 0 alone does.

Launched as ``torchrun --nproc-per-node N -m eagle_engine train-draft ...``: every rank holds the whole
dataset and draws the same global batch per step, takes its own share of it, and DDP averages the gradients
(NCCL on GPUs, gloo on CPUs). Only rank 0 writes files and prints. The output directory must be one that
every rank sees (one node, or a shared file system), since every rank reads a checkpoint back on resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DataParallel:
    """This process's place: ``rank`` of ``world`` (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float, device) -> float:
        """``value`` summed over the ranks (itself on one)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0])


def join(device: torch.device) -> tuple[DataParallel, torch.device]:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (``cuda:LOCAL_RANK`` on CUDA); else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DataParallel(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size()), device
