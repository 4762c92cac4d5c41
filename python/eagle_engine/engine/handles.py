"""A request as the scheduler holds it: what was asked (:class:`Request`), what comes back piece by piece
(:class:`Output`), and its bookkeeping (:class:`Handle`): the sequence the runner decodes, the text made of
its tokens, stop strings, what is returned and counted, and the timestamps of its life (metrics)."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..speculative.sampling import SamplingParams

FINISH_REASONS = {"stop_token": "stop", "stop": "stop", "max_new_tokens": "length", "max_length": "length"}


@dataclass
class Request:
    """One generation request. ``stop_ids`` is the full set of ids that end it (the model's eos included);
    ``detokenizer`` (``push(ids) -> str``, ``flush() -> str``) turns its tokens into text, needed for
    ``stop_strings``; without it the outputs carry token ids only. ``seed`` None: a random seed, drawn when
    the request starts. ``speculative``: decoded by the engine's method (else by vanilla steps).
    ``priority``: lower starts first (ties: first come, first served). ``timeout``: seconds the request may
    wait for a slot; past that it never starts and fails with :class:`QueueTimeoutError`. ``arrival``: when
    the request arrived (``time.perf_counter()``; the server's: before tokenizing), where its time to first
    token and end-to-end latency start (default: when it is submitted)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    detokenizer: object | None = None
    speculative: bool = True
    priority: int = 0
    timeout: float | None = None
    arrival: float | None = None


@dataclass
class Output:
    """A piece of a request's result. ``finish_reason``: ``None`` while running, then ``"stop"`` (stop token
    or string), ``"length"``, ``"cancelled"``, ``"timeout"`` (no slot in time) or ``"error"`` (``error``
    holds the exception; for a timeout, a :class:`~.scheduler.QueueTimeoutError`).
    ``completion_tokens``: tokens returned so far (with a stop string, those whose text precedes it)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


class Handle:
    """A submitted request's bookkeeping (engine-thread state, except ``cancelled``). ``deliver(Output)`` is
    called on the engine thread (hand it over to another thread yourself)."""

    _ids = itertools.count()

    def __init__(self, request: Request, deliver: Callable[[Output], None], rid: int | None = None):
        self.id = next(self._ids) if rid is None else rid
        self.request, self.deliver = request, deliver
        self.seq = None
        self.cancelled = False
        self.text = ""  # all text so far
        self.emitted = 0  # characters of ``text`` already delivered
        self.token_ends: list[int] = []  # len(text) after each token
        self.cut: int | None = None  # where a stop string cut the text
        self.sent = 0  # tokens delivered
        self.submitted = time.perf_counter()
        self.arrived = self.submitted if request.arrival is None else request.arrival
        self.admitted = self.first_token = self.last_token = self.finished = None
        self.deadline = None if request.timeout is None else self.submitted + request.timeout

    def order(self) -> tuple[int, int]:
        """Admission order: priority, then arrival."""
        return self.request.priority, self.id

    def advance(self, tokens: list[int]) -> tuple[Output, bool]:
        """Turn a step's new tokens into text and apply stop strings: the output to deliver, and whether a
        stop string ended the request here while its sequence runs on (the scheduler ends that with its
        next plan; the sequence itself is left alone, so every rank's runner stays the same)."""
        seq, r = self.seq, self.request
        text_ids = tokens
        if seq.done and seq.stop_reason == "stop_token" and tokens and tokens[-1] in r.stop_ids:
            text_ids = tokens[:-1]  # the stop token's own text is not part of the completion
        finish = FINISH_REASONS.get(seq.stop_reason, seq.stop_reason) if seq.done else None
        piece, stopped = "", False
        returned = len(seq.tokens)  # returned so far: every token, without text to look at
        if r.detokenizer is not None:
            for tok in text_ids:  # one at a time: where each token's text ends (usage at a stop string)
                self.text += r.detokenizer.push([tok])
                self.token_ends.append(len(self.text))
            if finish is not None:
                self.text += r.detokenizer.flush()
            piece, cut = self._take_text(final=finish is not None)
            if cut is not None:  # a stop string, even in the round that also reached a limit
                self.cut = cut
                stopped, finish = finish is None, "stop"
            # With text: the tokens whose text begins before what was delivered (before the stop string
            # once there is one), so a count never goes back and text held back is not counted yet.
            starts = [0] + self.token_ends[:-1]
            if self.cut is not None:
                returned = bisect.bisect_left(starts, self.cut)
            elif finish is None:
                returned = bisect.bisect_left(starts, self.emitted)
        new, self.sent = seq.tokens[self.sent : returned], max(self.sent, returned)
        return Output(new, piece, finish, len(r.prompt), self.sent), stopped

    def _take_text(self, final: bool) -> tuple[str, int | None]:
        """The deliverable text since the last delivery, and where a stop string cut it (None: no cut); a
        tail that may begin a stop string is held back until more text decides it."""
        stops = self.request.stop_strings
        start = max(0, self.emitted - max((len(s) for s in stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if hits:
            end = max(min(hits), self.emitted)
            piece, self.text, self.emitted = self.text[self.emitted : end], self.text[:end], end
            return piece, end
        end = len(self.text)
        if not final:
            for s in stops:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece, self.emitted = self.text[self.emitted : end], end
        return piece, None


__all__ = ["Request", "Output", "Handle", "FINISH_REASONS"]
