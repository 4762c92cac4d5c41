"""Per-sequence state during generation and the result handed back to the caller."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..speculative.sampling import SamplingParams


@dataclass
class GenerationResult:
    """One sequence's output.

    ``tokens``: new token ids (a stop token that ended generation is included, as Hugging Face does).
    ``stop_reason``: ``"stop_token"``, ``"max_new_tokens"`` or ``"max_length"`` (the engine's maximum length,
    ``max_model_len``), or what :meth:`Sequence.finish` set (e.g. ``"stop_string"``, ``"cancelled"``).
    ``accept_lengths``: EAGLE only: the tokens each verification round kept (accepted draft tokens plus the
    bonus token, fewer when a stop ended the round), so every entry is >= 1; the first token, which the
    prefill produces, is not a round and is not counted: ``sum(accept_lengths) == len(tokens) - 1``.
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
        """Mean tokens kept per verification round; ``nan`` for vanilla results."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else float("nan")


_ids = itertools.count()


class Sequence:
    """One request as the runner sees it: prompt, sampling settings, limits, and what it has produced.

    ``max_new_tokens`` is cut to what ``max_length`` leaves after the prompt (the stop reason then says
    ``max_length``). The runner appends tokens with :meth:`append`, which applies stop tokens and the limit
    (the host does; the device commits every accepted token, and a finished sequence's extra rows are
    dropped with its slot); :meth:`finish` ends a sequence for a reason the host decides (stop strings, a
    cancelled request): the runner releases it at its next step.
    """

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        seed: int = 0,
        max_length: int | None = None,
    ):
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.params = params
        self.stop_ids = frozenset(stop_ids)
        self.seed = seed
        room = max_new_tokens if max_length is None else max_length - len(prompt)
        self.limit = min(max_new_tokens, room)
        self.limit_reason = "max_new_tokens" if max_new_tokens <= room else "max_length"
        self.tokens: list[int] = []
        self.accept_lengths: list[int] = []
        self.stop_reason: str | None = None if self.limit > 0 else self.limit_reason
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, prompt={len(self.prompt)} tokens, new={len(self.tokens)})"

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def committed_length(self) -> int:
        """Cache rows the sequence holds between rounds: its prompt and every emitted token but the last."""
        return len(self.prompt) + len(self.tokens) - 1

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

    def finish(self, reason: str) -> None:
        """End the sequence now (if it is still running) for a reason the host decided."""
        if not self.done:
            self.stop_reason = reason

    def result(self) -> GenerationResult:
        return GenerationResult(
            list(self.tokens),
            self.stop_reason or self.limit_reason,
            len(self.prompt),
            list(self.accept_lengths),
            self.prefill_seconds,
            self.decode_seconds,
        )
