"""Continuous batching over the runner: requests wait in a bounded queue, join the running batch between
rounds (their prefill is its own step), decode with the others and leave when done, freeing their slot.

One engine thread owns the runner: every runner call happens there. Other threads (the asyncio server) call
:meth:`Scheduler.submit` and :meth:`Scheduler.cancel`, both thread-safe; results come back through the
request's ``deliver`` callback, called on the engine thread (hand them over with
``loop.call_soon_threadsafe``). A failure inside one request (its text handling, its delivery) fails that
request only; a failing runner step fails the sequences of that step, and the scheduler goes on.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import EagleError, InvalidRequestError
from ..spec.sampling import SamplingParams

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop_token": "stop", "stop": "stop", "max_new_tokens": "length", "max_length": "length"}


class QueueFullError(EagleError):
    """The waiting queue is full: the server is overloaded (HTTP 503)."""


@dataclass
class Request:
    """One generation request. ``stop_ids`` is the full set of ids that end it (the model's eos included);
    ``detokenizer`` (``push(ids) -> str``, ``flush() -> str``) turns its tokens into text, needed for
    ``stop_strings``; without it the outputs carry token ids only."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    detokenizer: object | None = None


@dataclass
class Output:
    """A piece of a request's result. ``finish_reason``: ``None`` while running, then ``"stop"`` (stop token
    or string), ``"length"``, ``"cancelled"`` or ``"error"`` (``error`` holds the exception)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


class Handle:
    """A submitted request's bookkeeping (engine-thread state, except ``cancelled``)."""

    _ids = itertools.count()

    def __init__(self, request: Request, deliver: Callable[[Output], None]):
        self.id = next(self._ids)
        self.request, self.deliver = request, deliver
        self.seq = None
        self.cancelled = False
        self.text = ""  # all text so far
        self.emitted = 0  # characters of ``text`` already delivered
        self.submitted = time.perf_counter()


class Scheduler:
    """Runs ``runner`` on its own thread. ``new_sequence(prompt, params, max_new_tokens, stop_ids, seed)``
    makes the runner's sequences. ``on_round(kind, seconds, batch_size)`` (kind ``"prefill"`` or ``"round"``)
    and ``on_finish(handle, output)`` are optional observers (metrics), called on the engine thread."""

    def __init__(
        self,
        runner,
        new_sequence: Callable,
        max_queue: int = 256,
        on_round: Callable | None = None,
        on_finish: Callable | None = None,
    ):
        self.runner, self.new_sequence, self.max_queue = runner, new_sequence, max_queue
        self.on_round, self.on_finish = on_round, on_finish
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: dict[object, Handle] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ any thread

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="eagle-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request, deliver: Callable[[Output], None]) -> Handle:
        """Queue ``request``; raises :class:`QueueFullError` when ``max_queue`` requests already wait, and
        :class:`InvalidRequestError` when it cannot fit the model's length."""
        room = self.runner.max_model_len - len(request.prompt)
        if not request.prompt or room < 1:
            raise InvalidRequestError(
                f"the prompt has {len(request.prompt)} tokens; the model's maximum length is "
                f"{self.runner.max_model_len}, leaving no room to generate"
            )
        handle = Handle(request, deliver)
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop ``handle`` at the next round boundary and free its slot (no further output is delivered)."""
        with self._cond:
            handle.cancelled = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._running):
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as e:  # a bug in the bookkeeping: fail what runs, keep the thread alive
                    log.exception("engine loop error; failing the running requests")
                    for h in list(self._running.values()):
                        self._fail(h, e)
        for handle in list(self._running.values()) + list(self._waiting):
            self._fail(handle, EagleError("the server shut down"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [h for h in self._waiting if h.cancelled]
            for h in gone:
                self._waiting.remove(h)
        for h in [h for h in self._running.values() if h.cancelled]:
            h.seq.finish("cancelled")
            self._leave(h)
            out = Output([], "", "cancelled", len(h.request.prompt), len(h.seq.tokens))
            if self.on_finish is not None:  # (a failing observer is caught by the loop)
                self.on_finish(h, out)

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them together (one step)."""
        joining = []
        with self._cond:
            while self._waiting and len(joining) < self.runner.free_slots():
                joining.append(self._waiting.popleft())
        for h in list(joining):
            try:
                r = h.request
                seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**63)
                h.seq = self.new_sequence(r.prompt, r.params, r.max_tokens, r.stop_ids, seed)
            except Exception as e:  # e.g. a parameter the runner rejects
                joining.remove(h)
                self._fail(h, e)
        if not joining:
            return
        t0 = time.perf_counter()
        try:
            first = self.runner.add([h.seq for h in joining])
        except Exception as e:
            if len(joining) == 1:
                self._fail(joining[0], e)
                return
            for h in joining:  # a failed prefill may have left them in the batch
                with contextlib.suppress(Exception):
                    self.runner.release(h.seq)
            first = {}
            for h in joining:  # find the request that does not fit: add one at a time
                try:
                    first.update(self.runner.add([h.seq]))
                except Exception as e:
                    self._fail(h, e)
            joining = [h for h in joining if h.seq in first or h.seq.done]
        for h in joining:
            self._running[h.seq] = h
        self._round_done("prefill", time.perf_counter() - t0, len(joining))
        self._deliver_all({h.seq: first.get(h.seq, []) for h in joining})

    def _step(self) -> None:
        t0 = time.perf_counter()
        batch = len(self._running)
        try:
            kept = self.runner.step()
        except Exception as e:  # the round's state is unknown: its sequences fail, the server goes on
            for h in list(self._running.values()):
                self._fail(h, e)
            return
        self._round_done("round", time.perf_counter() - t0, batch)
        self._deliver_all({seq: kept.get(seq, []) for seq in self._running})

    def _round_done(self, kind: str, seconds: float, batch: int) -> None:
        if self.on_round is not None:
            try:
                self.on_round(kind, seconds, batch)
            except Exception:
                pass

    def _deliver_all(self, kept: dict) -> None:
        """Hand out the tokens ``add``/``step`` kept; the runner has already released the sequences they
        finished."""
        for seq, tokens in kept.items():
            h = self._running.get(seq)
            if h is None:
                continue
            try:
                self._advance(h, list(tokens), runner_released=seq.done)
            except Exception as e:
                self._fail(h, e)

    def _advance(self, h: Handle, tokens: list[int], runner_released: bool) -> None:
        """Turn new tokens into text, apply stop strings, deliver; finish and release a done request."""
        seq, r = h.seq, h.request
        text_ids = tokens
        if seq.done and seq.stop_reason == "stop_token" and tokens and tokens[-1] in r.stop_ids:
            text_ids = tokens[:-1]  # the stop token's own text is not part of the completion
        finish = FINISH_REASONS.get(seq.stop_reason, seq.stop_reason) if seq.done else None
        piece = ""
        if r.detokenizer is not None:
            h.text += r.detokenizer.push(text_ids) if text_ids else ""
            if finish is not None:
                h.text += r.detokenizer.flush()
            piece, hit = self._take_text(h, final=finish is not None)
            if hit and finish is None:
                seq.finish("stop")
                finish, runner_released = "stop", False
        if finish is not None:
            self._leave(h, release=not runner_released)
        out = Output(tokens, piece, finish, len(r.prompt), len(seq.tokens))
        if finish is not None and self.on_finish is not None:
            self.on_finish(h, out)
        h.deliver(out)

    @staticmethod
    def _take_text(h: Handle, final: bool) -> tuple[str, bool]:
        """The deliverable text since the last delivery, cut at the first stop string (``hit``); a tail that
        may begin a stop string is held back until more text decides it."""
        stops = h.request.stop_strings
        start = max(0, h.emitted - max((len(s) for s in stops), default=0))
        hits = [i for i in (h.text.find(s, start) for s in stops) if i >= 0]
        if hits:
            end = max(min(hits), h.emitted)
            piece, h.text, h.emitted = h.text[h.emitted : end], h.text[:end], end
            return piece, True
        end = len(h.text)
        if not final:
            for s in stops:
                for k in range(min(len(s) - 1, end - h.emitted), 0, -1):
                    if h.text.endswith(s[:k]):
                        end = min(end, len(h.text) - k)
                        break
        piece, h.emitted = h.text[h.emitted : end], end
        return piece, False

    def _leave(self, h: Handle, release: bool = True) -> None:
        """Remove a finished request from the batch and (unless the runner did) free its slot now."""
        if self._running.pop(h.seq, None) is not None and release:
            try:
                self.runner.release(h.seq)
            except Exception:
                pass

    def _fail(self, h: Handle, error: BaseException) -> None:
        if not isinstance(error, InvalidRequestError):
            log.warning("request %d failed: %s: %s", h.id, type(error).__name__, error)
        if h.seq is not None:
            try:
                h.seq.finish("error")
            except Exception:
                pass
            self._leave(h)
        out = Output([], "", "error", len(h.request.prompt), 0 if h.seq is None else len(h.seq.tokens), error)
        try:
            if self.on_finish is not None:
                self.on_finish(h, out)
            h.deliver(out)
        except Exception:
            pass
