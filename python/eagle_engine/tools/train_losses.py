"""The training losses of draft heads, over the target's features, restricted to the trained positions.

EAGLE-1/2 (eagle-facts.md): the head reads ``(feature_i, token_{i+1})`` and predicts ``feature_{i+1}``;
loss ``feature_weight * SmoothL1(pred, f_{i+1}) + ce_weight * CE(lm_head(pred), softmax(lm_head(f_{i+1})))``
with uniform noise on the input features.
EAGLE-3: the head reads ``(fc(aux_i), token_{i+1})`` and is trained by cross-entropy against the target's
next-token distribution, unrolled over ``unroll`` steps that feed back its own output (training-time test),
the i-th step weighted ``0.8 ** i``.
Medusa-1 heads (:func:`medusa_loss`): head ``i`` reads the target's feature at ``t`` and is trained by
cross-entropy against the text's token at ``t + i + 2``, weighted ``0.8 ** i``.

Every term is a sum over the trained rows (``loss_mask``, see :mod:`.training_data`) divided by the number
of trained rows of that term in the *global* batch (``denominators``), so the terms of micro-batches and
data-parallel ranks add up to exactly the global batch's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.draft import Eagle1Head, Eagle3Head
from ..models.llama import LlamaModel
from ..models.parallel import vocab_logits


@dataclass
class FeatureBatch:
    """Teacher-forcing data for one batch of equal-length rows: ``ids`` long ``[B, T]``, ``hidden``
    fp32 ``[B, T, H]`` (the target's top-layer features), ``aux`` fp32 ``[B, T, 3H]`` or None,
    ``target_logp`` fp32 ``[B, T, V]``: the target's next-token log-distribution after each position (None
    when not asked for: Medusa's loss uses the text's tokens); ``loss_mask`` bool ``[B, T]``; ``noise``
    ``[B, T - 1, H]``: what EAGLE-1/2's input features get added (None: drawn here)."""

    ids: torch.Tensor
    hidden: torch.Tensor
    aux: torch.Tensor | None
    target_logp: torch.Tensor | None
    loss_mask: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        return torch.ones_like(self.ids, dtype=torch.bool) if self.loss_mask is None else self.loss_mask


def batch_from_features(ids, hidden, aux, lm_head_weight, with_logp: bool, loss_mask=None) -> FeatureBatch:
    """A :class:`FeatureBatch` from the target's features (``hidden`` in the target's dtype, as the target
    computes its logits from them), online or read back from a feature cache alike."""
    logp = torch.log_softmax(vocab_logits(hidden, lm_head_weight, None), -1) if with_logp else None
    return FeatureBatch(ids, hidden.float(), None if aux is None else aux.float(), logp, loss_mask)


@torch.no_grad()
def collect_features(
    target: LlamaModel,
    ids: torch.Tensor,
    aux_layers: tuple[int, ...] = (),
    with_logp: bool = True,
    loss_mask: torch.Tensor | None = None,
) -> FeatureBatch:
    """Run the target over ``ids`` long ``[B, T]`` (no padding inside a row) and keep what training needs
    (the full-vocabulary ``target_logp`` only ``with_logp``)."""
    b, t = ids.shape
    cache = target.allocate_cache(b, t)
    target.ensure_positions(t)
    out = target(ids, torch.arange(t, device=ids.device).expand(b, t), cache, None, aux_layers)
    return batch_from_features(ids, out.hidden, out.aux, target.lm_head_weight, with_logp, loss_mask)


def term_masks(head, mask: torch.Tensor, unroll: int) -> list[torch.Tensor]:
    """The trained rows of each loss term, from ``loss_mask`` ``[B, T]`` (see the module docstring)."""
    t = mask.shape[1]
    if getattr(head, "kind", "") == "medusa":
        return [mask[:, i + 1 : t - 1] for i in range(min(head.num_heads, t - 2))]
    if isinstance(head, Eagle1Head):
        return [mask[:, 1:]]
    return [mask[:, 1 + i :] for i in range(min(unroll, t - 1))]


def loss_denominators(head, mask: torch.Tensor, unroll: int) -> list[float]:
    """Trained rows per term over ``mask`` (the global batch's): what each term's sum is divided by."""
    return [max(1.0, float(m.sum())) for m in term_masks(head, mask, unroll)]


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask.to(values.dtype)).sum()


def medusa_loss(heads, batch: FeatureBatch, denominators: list[float], decay: float = 0.8) -> torch.Tensor:
    """Medusa-1's loss: ``sum_i decay ** i * CE(head_i(f_t), x_{t+i+2})`` over trained positions ``t`` that
    have that token, ``decay`` the official ``medusa_decay_coefficient``.

    Labels are the text's own tokens, as in Medusa-1 (whose data is the target's own generations, so that
    they are the target's next tokens). The heads see the target's features exactly (no noise)."""
    b, t, h = batch.hidden.shape
    features = heads.features(batch.hidden.to(heads.projection(0).dtype).reshape(b * t, h)).view(-1, b, t, h)
    loss = 0.0
    for i, mask in enumerate(term_masks(heads, batch.mask(), 0)):
        n = t - (i + 2)  # positions whose token i + 2 ahead is in the row
        logits = F.linear(features[i, :, :n], heads.projection(i)).float()
        ce = F.cross_entropy(logits.flatten(0, 1), batch.ids[:, i + 2 :].flatten(), reduction="none")
        loss = loss + decay**i * _masked_sum(ce.view(b, n), mask) / denominators[i]
    return loss


def _run_head(head, tokens, features):
    """Causal head forward over fresh caches, with autograd (reference ops)."""
    b, t = tokens.shape
    cache = head.allocate_cache(b, t)
    head.ensure_positions(t)
    positions = torch.arange(t, device=tokens.device).expand(b, t)
    return head.step(tokens, features, positions, cache)


def head_loss(
    head,
    lm_head_weight: torch.Tensor,
    batch: FeatureBatch,
    noise: float,
    unroll: int,
    denominators: list[float] | None = None,
    feature_weight: float = 1.0,
    ce_weight: float = 0.1,
) -> torch.Tensor:
    """The training loss of ``head`` on one batch (see the module docstring); ``lm_head_weight`` ``[V, H]``
    is the target's (EAGLE-1/2 ranks its predictions with it); ``denominators`` default to this batch's
    own counts (:func:`loss_denominators`)."""
    if denominators is None:
        denominators = loss_denominators(head, batch.mask(), unroll)
    if getattr(head, "kind", "") == "medusa":
        return medusa_loss(head, batch, denominators)
    masks = term_masks(head, batch.mask(), unroll)
    tokens = batch.ids[:, 1:]  # row i pairs position i's feature with token i + 1
    target_logp = batch.target_logp[:, 1:]  # the distribution row i must predict (after token i + 1)
    dtype = head.fc.weight.dtype
    if isinstance(head, Eagle1Head):
        feats = batch.hidden[:, :-1]
        shake = (torch.rand_like(feats) - 0.5) * noise if batch.noise is None else batch.noise.to(feats)
        pred = _run_head(head, tokens, (feats + shake).to(dtype)).float()
        feature_loss = F.smooth_l1_loss(pred, batch.hidden[:, 1:], reduction="none").mean(-1)
        logp = torch.log_softmax(F.linear(pred, lm_head_weight.float()), -1)
        ce = -(target_logp.exp() * logp).sum(-1)
        return (
            feature_weight * _masked_sum(feature_loss, masks[0]) + ce_weight * _masked_sum(ce, masks[0])
        ) / denominators[0]
    assert isinstance(head, Eagle3Head)
    feats = head.fc(batch.aux[:, :-1].to(dtype))
    loss = 0.0
    for i, mask in enumerate(masks):
        n = tokens.shape[1] - i
        pred = _run_head(head, tokens[:, i:], feats[:, :n])
        logp = torch.log_softmax(head.lm_head(head.norm(pred)).float(), -1)
        goal = to_draft_vocab(head, target_logp[:, i:]).exp()
        loss = loss + (0.8**i) * _masked_sum(-(goal * logp).sum(-1), mask) / denominators[i]
        feats = pred[:, :-1]  # the next step reads the head's own prediction (training-time test)
    return loss


def to_draft_vocab(head: Eagle3Head, logp: torch.Tensor) -> torch.Tensor:
    """Target log-probs ``[..., V]`` -> renormalised log-probs over the draft vocabulary ``[..., Vd]``."""
    draft_ids = torch.arange(head.d2t.numel(), device=logp.device) + head.d2t
    return torch.log_softmax(logp[..., draft_ids], -1)
