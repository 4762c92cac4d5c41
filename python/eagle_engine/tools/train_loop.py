"""The optimisation loop of draft-head training: global batches, micro-batches, data-parallel ranks,
checkpoints.

Each step draws a *global* batch of ``batch_size x ranks x accumulation`` rows from an RNG seeded by the
step alone (the same on every rank, and the same after a resume or a change of rank count); micro-batch
``a`` of rank ``r`` takes its rows ``[(a * ranks + r) * batch_size, ...)``. The noise EAGLE-1/2 adds to its
input features is drawn per row from a seed of (seed, step, row's place in the global batch). Each loss term
is divided by its trained-row count over the global batch (:mod:`.train_losses`), so 1 rank and N ranks of
the same global batch compute the same gradient, up to the order of floating-point sums.
AdamW(0.9, 0.95), linear warm-up then constant or cosine, gradient clipping (published EAGLE settings).
"""

from __future__ import annotations

import math
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import eagle_kernels as ops

from ..errors import TrainingInputError
from .checks import check_number
from .data_parallel import DataParallel
from .train_losses import FeatureBatch, collect_features, head_loss, loss_denominators
from .training_data import TrainingRows


@dataclass
class TrainConfig:
    """Optimisation settings (published EAGLE values where they apply; tiny models want a larger lr).
    ``batch_size`` is per rank and micro-batch; the global batch is ``batch_size x ranks x accumulation``."""

    steps: int = 1000
    lr: float = 3e-4
    batch_size: int = 4
    warmup_steps: int = 100
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    noise: float = 0.2  # uniform noise U(-noise/2, noise/2) added to input features
    grad_clip: float = 0.5
    unroll: int = 3  # EAGLE-3 training-time-test steps
    seed: int = 0
    schedule: str = "constant"  # after warm-up: "constant" (published) or "cosine" (decay to 10% of lr)
    accumulation_steps: int = 1  # micro-batches per rank and step

    def __post_init__(self):
        check_number("steps", self.steps, "int", low=0)
        check_number("batch_size", self.batch_size, "int", low=1)
        check_number("warmup_steps", self.warmup_steps, "int", low=0)
        check_number("unroll", self.unroll, "int", low=1)
        check_number("seed", self.seed, "int")
        check_number("accumulation_steps", self.accumulation_steps, "int", low=1)
        check_number("lr", self.lr, "float", positive=True)
        for name in ("feature_weight", "ce_weight", "noise", "grad_clip"):
            check_number(name, getattr(self, name), "float", low=0)
        if self.schedule not in ("constant", "cosine"):
            raise TrainingInputError(f"unknown lr schedule {self.schedule!r}: use 'constant' or 'cosine'")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then constant or cosine decay to 10%."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.schedule == "constant" or step < self.warmup_steps:
            return self.lr * warm
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


class OnlineFeatures:
    """Features computed by the target, batch by batch (the default source)."""

    def __init__(self, target, aux_layers: tuple[int, ...], with_logp: bool):
        self.target, self.aux_layers, self.with_logp = target, aux_layers, with_logp
        self.lm_head_weight = target.lm_head_weight

    def batch(self, rows: TrainingRows, index: list[int]) -> FeatureBatch:
        device = self.lm_head_weight.device
        pick = torch.tensor(index, dtype=torch.long)
        ids, mask = rows.ids[pick].to(device), rows.loss_mask[pick].to(device)
        return collect_features(self.target, ids, self.aux_layers, self.with_logp, mask)


def trainable_parameters(head) -> list[torch.nn.Parameter]:
    """The head's trained parameters, in a fixed order (a borrowed target embedding stays frozen)."""
    return [p for n, p in head.named_parameters() if n != "embed_tokens.weight" or head.owns_embedding]


def make_optimizer(head, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(0.9, 0.95) over :func:`trainable_parameters` (the published EAGLE setting)."""
    return torch.optim.AdamW(trainable_parameters(head), lr=cfg.lr, betas=(0.9, 0.95))


def global_batch(cfg: TrainConfig, step: int, num_rows: int, world: int) -> list[int]:
    """The row indices of ``step``'s global batch (drawn with replacement; the same on every rank)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    return [rng.randrange(num_rows) for _ in range(cfg.batch_size * world * cfg.accumulation_steps)]


def row_noise(cfg: TrainConfig, step: int, place: int, shape: tuple[int, int], device) -> torch.Tensor:
    """EAGLE-1/2's input-feature noise ``[T - 1, H]`` for the row at ``place`` of ``step``'s global batch,
    drawn on ``device`` (the same numbers on every rank of one device type)."""
    gen = torch.Generator(device).manual_seed(hash((cfg.seed, step, place)) & (2**63 - 1))
    return (torch.rand(shape, generator=gen, device=device) - 0.5) * cfg.noise


class _LossModule(torch.nn.Module):
    """The head and its loss as one module, so that DDP sees the backward of its ``forward``."""

    def __init__(self, head, lm_head_weight, cfg: TrainConfig):
        super().__init__()
        self.head, self.cfg = head, cfg
        self._lm_head = [lm_head_weight]  # frozen and not a parameter of this module

    def forward(self, batch: FeatureBatch, denominators: list[float]) -> torch.Tensor:
        cfg = self.cfg
        return head_loss(
            self.head,
            self._lm_head[0],
            batch,
            cfg.noise,
            cfg.unroll,
            denominators,
            cfg.feature_weight,
            cfg.ce_weight,
        )


def train_head(
    head,
    target,
    rows,
    cfg: TrainConfig,
    *,
    progress=None,
    start_step: int = 0,
    optimizer=None,
    features=None,
    data_parallel: DataParallel | None = None,
):
    """Train ``head`` in place; returns ``(losses, optimizer)`` (the global batch's loss per step).

    ``rows``: :class:`~.training_data.TrainingRows`, or a long ``[N, T]`` tensor (every position trained).
    ``features``: where the target's features come from (default: :class:`OnlineFeatures` of ``target``;
    a :class:`~.feature_store.FeatureStore` reads cached ones, and ``target`` may then be None).
    ``progress(step, loss)`` is called after each step. The head runs the reference ops so that autograd
    flows; on CUDA under bf16 autocast.
    """
    rows = rows if isinstance(rows, TrainingRows) else TrainingRows.unmasked(rows)
    dp = data_parallel or DataParallel()
    params = trainable_parameters(head)
    trained = {id(p) for p in params}
    for p in head.parameters():  # a borrowed embedding gets no gradient (nor DDP traffic)
        p.requires_grad_(id(p) in trained)
    if optimizer is None:
        optimizer = make_optimizer(head, cfg)
    medusa = getattr(head, "kind", "") == "medusa"
    if features is None:
        aux_layers = head.aux_layers(target.config.num_hidden_layers)
        features = OnlineFeatures(target, aux_layers, with_logp=not medusa)  # Medusa learns the tokens
    device = features.lm_head_weight.device
    module = _LossModule(head, features.lm_head_weight, cfg)
    if dp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    eagle1 = getattr(head, "kind", "") == "eagle1"
    head.train()
    losses = []
    b, world, accum = cfg.batch_size, dp.world, cfg.accumulation_steps
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        index = global_batch(cfg, step, len(rows), world)
        denominators = loss_denominators(head, rows.loss_mask[torch.tensor(index)], cfg.unroll)
        optimizer.zero_grad(set_to_none=True)
        share = 0.0
        for a in range(accum):
            start = (a * world + dp.rank) * b
            with ops.reference_backend():  # autograd flows through the reference ops
                batch = features.batch(rows, index[start : start + b])
                if eagle1:
                    shape = (batch.hidden.shape[1] - 1, batch.hidden.shape[2])
                    noise = [row_noise(cfg, step, start + i, shape, device) for i in range(b)]
                    batch.noise = torch.stack(noise)
                sync = module.no_sync() if world > 1 and a < accum - 1 else nullcontext()
                with sync, autocast:
                    loss = module(batch, denominators)
                (loss * world).backward()  # DDP averages over the ranks; the shares are to be summed
            share += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(dp.sum(share))
        if progress is not None:  # outside the reference backend: an evaluation runs the engine's kernels
            progress(step, losses[-1])
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("training diverged: non-finite loss")
    return losses, optimizer


STATE_FILE = "trainer_state.pt"


def save_checkpoint(head, optimizer, step: int, losses: list[float], directory: str) -> None:
    """Head (official format) + ``trainer_state.pt`` (step, optimizer state, losses). Written beside the
    last one, which is moved aside before the new one takes its name and deleted after: a run killed at
    any moment leaves a complete checkpoint (:func:`find_checkpoint` finds it)."""
    from ..models.loading import save_draft

    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_draft(head, tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "losses": losses}, f"{tmp}/{STATE_FILE}")
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory: str) -> str | None:
    """The complete checkpoint of :func:`save_checkpoint` at ``directory`` (or the previous one, when a run
    was killed while replacing it); None when there is none."""
    for path in (directory, directory + ".old"):
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    return None


def load_checkpoint(directory: str, target, cfg: TrainConfig):
    """``(head, optimizer, step, losses)`` from :func:`save_checkpoint`'s directory."""
    from ..models.loading import load_draft

    head = load_draft(directory, target, dtype=torch.float32)
    state = torch.load(f"{directory}/{STATE_FILE}", map_location=target.lm_head_weight.device)
    optimizer = make_optimizer(head, cfg)
    optimizer.load_state_dict(state["optimizer"])
    return head, optimizer, int(state["step"]), list(state["losses"])
