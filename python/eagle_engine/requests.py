"""Validation of generation requests and per-sequence bookkeeping shared by the vanilla and EAGLE loops."""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .errors import InvalidRequestError


@dataclass
class GenerationResult:
    """One sequence's output.

    ``tokens``: new token ids (a stop token that ended generation is included, as Hugging Face does).
    ``stop_reason``: ``"stop_token"``, ``"max_new_tokens"`` or ``"max_length"`` (the model's maximum length).
    ``accept_lengths``: EAGLE only: tokens produced by each target forward, counting the bonus token (so a
    round that accepts no draft token counts 1, and the first token, from prefill, counts 1 too).
    """

    tokens: list[int]
    stop_reason: str
    prompt_length: int
    accept_lengths: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the request's wall time (prefill included)."""
        return len(self.tokens) / self.total_seconds if self.total_seconds > 0 else float("nan")

    @property
    def mean_accept_length(self) -> float:
        """Mean tokens per target forward; ``nan`` for vanilla results."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else float("nan")


def normalize_prompts(input_ids, vocab_size: int, max_length: int) -> tuple[list[list[int]], bool]:
    """Accept one prompt (list of ints, 1-D tensor) or a batch (list of lists, 2-D tensor).

    Returns ``(prompts, is_batch)``. Raises :class:`InvalidRequestError` for an empty prompt or batch, a token
    id outside ``[0, vocab_size)``, or a prompt that leaves no room below ``max_length``.
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2) or input_ids.is_floating_point():
            raise InvalidRequestError(
                f"input_ids must be a 1-D or 2-D integer tensor, got {input_ids.dtype} "
                f"of shape {tuple(input_ids.shape)}"
            )
        input_ids = input_ids.tolist()
    elif hasattr(input_ids, "tolist") and not isinstance(input_ids, (list, tuple)):  # e.g. a NumPy array
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)):
        raise InvalidRequestError(
            f"input_ids must be a list of token ids or a list of such lists, got {type(input_ids).__name__}"
        )
    is_batch = len(input_ids) > 0 and all(isinstance(p, (list, tuple)) for p in input_ids)
    prompts = [_token_ids(p) for p in input_ids] if is_batch else [_token_ids(input_ids)]
    if not prompts:
        raise InvalidRequestError("empty batch of prompts")
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}" if is_batch else "prompt"
        if not prompt:
            raise InvalidRequestError(f"{where} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{where} holds token id {bad[0]!r} outside the vocabulary [0, {vocab_size})"
            )
        if len(prompt) >= max_length:
            raise InvalidRequestError(
                f"{where} has {len(prompt)} tokens; the model's maximum length is "
                f"{max_length}, leaving no room to generate"
            )
    return prompts, is_batch


def _token_ids(prompt) -> list[int]:
    """Python ints from integer-like ids (``int``, NumPy or 0-d torch integers); anything else is an error."""
    ids = []
    for t in prompt:
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))  # rejects floats, strings, lists
        except TypeError:
            raise InvalidRequestError(f"token ids must be integers, got {t!r}") from None
    return ids


def normalize_stop_ids(stop_token_ids: Iterable[int] | int | None, default: Iterable[int]) -> frozenset[int]:
    """``None`` -> the model's own end-of-sequence ids; an int or iterable of ints otherwise."""
    if stop_token_ids is None:
        return frozenset(default)
    if isinstance(stop_token_ids, int):
        return frozenset([stop_token_ids])
    ids = list(stop_token_ids)
    if not all(isinstance(t, int) for t in ids):
        raise InvalidRequestError(f"stop_token_ids must be integers, got {ids!r}")
    return frozenset(ids)


def check_max_new_tokens(max_new_tokens) -> int:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InvalidRequestError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return max_new_tokens


class SequenceState:
    """Output and stop bookkeeping of one sequence during generation."""

    def __init__(self, prompt: list[int], max_new_tokens: int, max_length: int, stop_ids: frozenset[int]):
        self.prompt = prompt
        room = max_length - len(prompt)
        self.limit = min(max_new_tokens, room)
        self.limit_reason = "max_new_tokens" if max_new_tokens <= room else "max_length"
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.accept_lengths: list[int] = []
        self.stop_reason: str | None = None if self.limit > 0 else self.limit_reason

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def append(self, new_tokens: list[int]) -> list[int]:
        """Add tokens in order until a stop token or the limit; return the ones actually kept."""
        kept = []
        for tok in new_tokens:
            if self.done:
                break
            self.tokens.append(tok)
            kept.append(tok)
            if tok in self.stop_ids:
                self.stop_reason = "stop_token"
            elif len(self.tokens) >= self.limit:
                self.stop_reason = self.limit_reason
        return kept

    def result(self, prefill_seconds: float, decode_seconds: float) -> GenerationResult:
        return GenerationResult(
            list(self.tokens),
            self.stop_reason or self.limit_reason,
            len(self.prompt),
            list(self.accept_lengths),
            prefill_seconds,
            decode_seconds,
        )


class Timer:
    """Wall-clock timer that waits for queued GPU work before reading the clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
