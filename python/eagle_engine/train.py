"""Training EAGLE draft heads on a target's own features.

EAGLE-1/2 (eagle-facts.md): the head reads ``(feature_i, token_{i+1})`` and predicts ``feature_{i+1}``;
loss ``feature_weight * SmoothL1(pred, f_{i+1}) + ce_weight * CE(lm_head(pred), softmax(lm_head(f_{i+1})))``
with uniform noise on the input features, AdamW(0.9, 0.95), warm-up then constant, gradient clipping.
EAGLE-3: the head reads ``(fc(aux_i), token_{i+1})`` and is trained by cross-entropy against the target's
next-token distribution, unrolled over ``unroll`` steps that feed back its own output (training-time test),
the i-th step weighted ``0.8 ** i``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import eagle_kernels as ops

from .models.draft import Eagle1Head, Eagle3Head
from .models.llama import LlamaModel


@dataclass
class TrainConfig:
    """Optimisation settings (published EAGLE values where they apply; tiny models want a larger lr)."""

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

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"bad training config: {self}")


@dataclass
class FeatureBatch:
    """Teacher-forcing data for one batch of equal-length sequences: ``ids`` long ``[B, T]``, ``hidden``
    ``[B, T, H]`` (the target's top-layer features), ``aux`` ``[B, T, 3H]`` or None, ``target_logp`` fp32
    ``[B, T, V]``: the target's next-token log-distribution after each position."""

    ids: torch.Tensor
    hidden: torch.Tensor
    aux: torch.Tensor | None
    target_logp: torch.Tensor


@torch.no_grad()
def collect_features(target: LlamaModel, ids: torch.Tensor, aux_layers: tuple[int, ...] = ()) -> FeatureBatch:
    """Run the target over ``ids`` long ``[B, T]`` (no padding) and keep what training needs."""
    b, t = ids.shape
    cache = target.allocate_cache(b, t)
    out = target(ids, torch.arange(t, device=ids.device).expand(b, t), cache, None, aux_layers)
    logp = torch.log_softmax(target.logits(out.hidden), -1)
    return FeatureBatch(ids, out.hidden.float(), None if out.aux is None else out.aux.float(), logp)


def _run_head(head, tokens, features):
    """Causal head forward over fresh caches, with autograd (reference ops)."""
    b, t = tokens.shape
    cache = head.allocate_cache(b, t)
    positions = torch.arange(t, device=tokens.device).expand(b, t)
    return head.step(tokens, features, positions, cache)


def head_loss(head, target: LlamaModel, batch: FeatureBatch, cfg: TrainConfig) -> torch.Tensor:
    """The training loss of ``head`` on one batch (see the module docstring)."""
    tokens = batch.ids[:, 1:]  # row i pairs position i's feature with token i + 1
    target_logp = batch.target_logp[:, 1:]  # the distribution row i must predict (after token i + 1)
    dtype = head.fc.weight.dtype
    if isinstance(head, Eagle1Head):
        feats = batch.hidden[:, :-1]
        noisy = feats + (torch.rand_like(feats) - 0.5) * cfg.noise
        pred = _run_head(head, tokens, noisy.to(dtype)).float()
        feature_loss = F.smooth_l1_loss(pred, batch.hidden[:, 1:])
        logp = torch.log_softmax(F.linear(pred, target.lm_head_weight.float()), -1)
        ce = -(target_logp.exp() * logp).sum(-1).mean()
        return cfg.feature_weight * feature_loss + cfg.ce_weight * ce
    assert isinstance(head, Eagle3Head)
    feats = head.fc(batch.aux[:, :-1].to(dtype))
    loss = 0.0
    for i in range(cfg.unroll):
        n = tokens.shape[1] - i
        if n <= 0:
            break
        pred = _run_head(head, tokens[:, i:], feats[:, :n])
        logp = torch.log_softmax(head.lm_head(head.norm(pred)).float(), -1)
        goal = _to_draft_vocab(head, target_logp[:, i:]).exp()
        loss = loss + (0.8**i) * -(goal * logp).sum(-1).mean()
        feats = pred[:, :-1]  # the next step reads the head's own prediction (training-time test)
    return loss


def _to_draft_vocab(head: Eagle3Head, logp: torch.Tensor) -> torch.Tensor:
    """Target log-probs ``[..., V]`` -> renormalised log-probs over the draft vocabulary ``[..., Vd]``."""
    draft_ids = torch.arange(head.d2t.numel(), device=logp.device) + head.d2t
    return torch.log_softmax(logp[..., draft_ids], -1)


def train_head(
    head,
    target: LlamaModel,
    sequences: torch.Tensor,
    cfg: TrainConfig,
    *,
    progress=None,
    start_step: int = 0,
    optimizer=None,
):
    """Train ``head`` in place on long ``[N, T]`` token sequences; returns ``(losses, optimizer)``.

    ``progress(step, loss)`` is called after each step (a progress bar, checkpoints). The target's features
    are computed per batch under no_grad; the head runs the reference ops so that autograd flows.
    """
    rng = random.Random(cfg.seed + start_step)
    params = [p for n, p in head.named_parameters() if n != "embed_tokens.weight" or head.owns_embedding]
    for p in params:
        p.requires_grad_(True)
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))
    aux_layers = head.aux_layers(target.config.num_hidden_layers)
    head.train()
    losses = []
    with ops.reference_backend():
        for step in range(start_step, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            rows = [rng.randrange(sequences.shape[0]) for _ in range(cfg.batch_size)]
            batch = collect_features(target, sequences[rows], aux_layers)
            loss = head_loss(head, target, batch, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    head.eval()
    for p in params:
        p.requires_grad_(False)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("training diverged: non-finite loss")
    return losses, optimizer
