"""Data parallelism for training under ``torchrun``: joining the process group, and what rank 0 alone does.

Launched as ``torchrun --nproc-per-node N -m eagle_engine train-draft ...``: every rank holds the whole
dataset and draws the same global batch per step, takes its own share of it, and DDP averages the gradients
(NCCL on GPUs, gloo on CPUs). Only rank 0 writes files and prints. The output directory must be one that
every rank sees (one node, or a shared file system), since every rank reads a checkpoint back on resume.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingInputError

TIMEOUT_MINUTES = 120  # the longest a rank waits in a collective (an evaluation, a checkpoint)


@dataclass
class DataParallel:
    """This process's place: ``rank`` of ``world`` (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # this rank's (collectives on NCCL need CUDA tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def check_same(self, value: int, what: str) -> None:
        """Raise :class:`TrainingInputError` unless every rank has the same ``value`` (e.g. a resumed step:
        a rank that could not see the checkpoint would otherwise train from step 0)."""
        if self.world == 1:
            return
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise TrainingInputError(
                f"the ranks disagree on {what} (from {-int(t[1])} to {int(t[0])}): every rank must see the "
                "same --out directory (one node, or a shared file system)"
            )

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (itself on one)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
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
        # Rank 0 evaluates while the others wait at a barrier: longer than the default timeouts allow.
        timeout = datetime.timedelta(minutes=TIMEOUT_MINUTES)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DataParallel(dist.get_rank(), dist.get_world_size(), device), device
