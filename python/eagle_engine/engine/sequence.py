"""Per-sequence state during generation and the result handed back to the caller."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


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
