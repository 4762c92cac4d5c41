"""Sampling parameters and the target distribution they define (temperature, top-k, top-p)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

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
    """The distribution sampling draws from: fp32 ``[..., V]`` logits -> probabilities ``[..., V]``.

    Applied in Hugging Face's order: temperature, then top-k, then top-p (keep the smallest set of most likely
    tokens whose mass reaches ``top_p``; always at least one).
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the first token always survives (mass_before == 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_generators(seed: int | list[int] | None, batch: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sequence. An int seeds each of them alike, so a sequence samples the same way alone
    or in a batch; a list gives one seed per sequence; None draws a fresh random seed."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch
    if len(seeds) != batch or not all(isinstance(s, int) for s in seeds):
        raise InvalidRequestError(f"seed must be an int or a list of {batch} ints, got {seed!r}")
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        gens.append(g)
    return gens


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    """Next token per row of fp32 ``[B, V]`` logits: argmax when greedy, else one draw per row's generator."""
    if params.greedy:
        return logits.argmax(-1)
    probs = target_probs(logits, params)
    return torch.cat([torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])])
