"""Sampling parameters, the target distribution they define, and sampling with per-sequence parameters.

Randomness comes from :func:`eagle_kernels.counter_uniform`: each sequence has a seed and a counter on the
device, so a seeded sequence draws the same numbers alone or in any batch, with no ``torch.Generator`` and no
host round trip (what a CUDA graph needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import eagle_kernels as ops

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        import math
        import numbers
        import operator

        def number(value) -> bool:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return False
            try:
                return math.isfinite(value)
            except OverflowError:  # an int too large for a float
                return False

        if not number(self.temperature) or not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be a finite number in (0, 1], got {self.top_p!r}")
        try:
            if isinstance(self.top_k, bool):
                raise TypeError
            top_k = operator.index(self.top_k)  # NumPy integers too; floats are errors, never truncated
        except TypeError:
            top_k = -1
        if top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: fp32 ``[..., V]`` logits -> probabilities ``[..., V]`` (a new
    tensor; ``logits`` is not changed).

    Applied in Hugging Face's order: temperature, then top-k (ties with the k-th logit are kept), then top-p
    (keep the smallest set of most likely tokens whose mass reaches ``top_p``, and every token tied with the
    last one kept; always at least one).
    """
    rows = logits.float().clone()
    shape, dev = rows.shape[:-1], logits.device
    return probs_per_row(
        rows,
        torch.full(shape, float(params.temperature), device=dev),
        torch.full(shape, float(params.top_p), device=dev),
        torch.full(shape, int(params.top_k), dtype=torch.int64, device=dev),
        max_top_k=params.top_k,
        use_top_p=params.top_p < 1.0,
    )


def probs_per_row(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    max_top_k: int,
    use_top_p: bool,
) -> torch.Tensor:
    """:func:`target_probs` with one set of parameters per row, **in place**, on the device, with no host
    synchronisation and no temporary the size of ``logits``.

    ``logits`` fp32 ``[..., V]`` (at most 3 dims, contiguous last dim; a slice of a bigger buffer is fine)
    becomes the probabilities and is returned; ``temperature``/``top_p`` fp32 and ``top_k`` int64 (0 = off),
    each ``logits.shape[:-1]`` (broadcast views are fine). Rows with ``temperature == 0`` are greedy: they get
    the one-hot distribution at their argmax, with which sampling verification accepts exactly what greedy
    verification does. ``max_top_k`` (largest ``top_k`` of any row, 0 = none) and ``use_top_p`` (any row with
    ``top_p < 1``) come from the host and skip work.

    Memory beyond ``logits``: ``O(rows * max_top_k)``. Top-k cuts at the k-th value of ``torch.topk``; top-p
    at :func:`eagle_kernels.top_p_threshold` (a radix select, no sort); both as one threshold per row, which
    :func:`eagle_kernels.masked_softmax_` applies in place.
    """
    rows, v = logits.shape[:-1], logits.shape[-1]
    greedy = temperature <= 0
    argmax = logits.argmax(-1, keepdim=True)
    logits.div_(torch.where(greedy, 1.0, temperature).unsqueeze(-1))
    threshold = torch.full(rows, float("-inf"), device=logits.device)
    if max_top_k > 0:
        widest = min(max_top_k, v)  # (the runner rounds max_top_k up: it may pass the vocabulary)
        k = torch.where(top_k > 0, top_k, widest).clamp(1, widest)
        kth = torch.topk(logits, widest, dim=-1).values.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)
        threshold = torch.where(top_k > 0, kth, threshold)  # rows without top-k drop nothing
    if use_top_p:
        threshold = ops.top_p_threshold(logits, top_p, threshold)  # rows with top_p = 1 keep theirs
    probs = ops.masked_softmax_(logits, threshold)
    # Greedy rows: the one-hot at the argmax (a [rows, 1] mask: nothing the size of the logits).
    at_argmax = torch.where(greedy.unsqueeze(-1), 1.0, probs.gather(-1, argmax))
    return probs.masked_fill_(greedy.unsqueeze(-1), 0.0).scatter_(-1, argmax, at_argmax)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: ``probs`` ``[N, V]`` (unnormalised is fine), ``uniforms`` ``[N]`` in [0, 1)
    -> int64 ``[N]``; the same draw verification makes for its bonus token, no host synchronisation."""
    return ops.reference.sample_inverse_cdf_batched(probs, uniforms)


def uniforms(seeds: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` uniforms per sequence from its seed and counter, then advance the counter in place (int64
    ``[B]`` each) -> fp32 ``[B, n]``."""
    u = ops.counter_uniform(seeds, offsets, n)
    offsets += n
    return u
