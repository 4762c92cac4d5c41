"""Continuous batching: the one driver of an engine's runners, for the Python API and the server alike.

Requests wait in a queue; between two rounds the waiting ones take the free slots of their runner (the
method's, or vanilla steps') and are prefilled together (their own step), decode with the others and leave
when done, freeing their slot. They start in order of ``priority`` (lower first), then of arrival (first come,
first served); one that waits past its ``timeout`` never starts and fails with :class:`QueueTimeoutError`.

One engine thread owns the runners: every runner call happens there. Other threads call :meth:`submit` and
:meth:`cancel`, both thread-safe; outputs come back through each request's ``deliver``, called on the engine
thread. A failure inside one request (its text handling, its delivery) fails that request only; a failing
runner step fails the sequences of that step, and the scheduler goes on.

Each iteration is a :class:`~.plan.Plan` decided by the leader and applied by every rank alike: under tensor
parallelism rank 0 decides and broadcasts it (:class:`~.plan.PlanChannel`), the other ranks follow
(:meth:`follow`), so all ranks run the same steps.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable

import torch

from ..errors import EagleError, InvalidRequestError
from .blocks import KVCacheTooSmallError
from .handles import Handle, Output, Request
from .plan import Admission, Plan, PlanChannel
from .sequence import Sequence

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0  # an idle leader under tensor parallelism sends an empty plan this often


class QueueFullError(EagleError):
    """The waiting queue is full: the server is overloaded (HTTP 503)."""


class QueueTimeoutError(EagleError):
    """A request waited for a slot longer than its timeout, and never started (HTTP 503)."""


class Scheduler:
    """Drives ``runner_of(speculative)`` (the engine's runner for a request's kind; made on first use) on its
    own thread. ``observer``, optional, gets ``round(kind, seconds, batch)``, ``admitted(handle)``,
    ``delivered(handle, n_tokens, now)`` and ``finished(handle, output)`` calls on the engine thread
    (metrics)."""

    def __init__(self, runner_of: Callable[[bool], object], max_model_len: int,
                 channel: PlanChannel | None = None, observer=None):
        self.runner_of, self.max_model_len, self.observer = runner_of, max_model_len, observer
        self.channel = channel or PlanChannel()
        self._waiting: list[tuple[tuple[int, int], Handle]] = []  # a heap by (priority, arrival)
        self._handles: dict[int, Handle] = {}  # every request not finished yet, by id
        self._running: dict[Sequence, Handle] = {}
        self._finishes: list[tuple[int, str]] = []  # host-side ends for the next plan
        self._runners: dict[bool, object] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self.local_submissions = True  # a follower's requests come from its own callers (see follow)
        self.on_broken: Callable[[], None] | None = None  # called (engine thread) when the ranks lose touch
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ any thread

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def cache_stats(self) -> dict:
        """The runners' KV caches, summed: ``{"queries", "hits"}`` (prompt tokens looked up in and found in
        the prefix cache), ``"preemptions"``, ``"used_blocks"``, ``"blocks"`` (any thread: plain reads)."""
        stats = dict.fromkeys(("queries", "hits", "preemptions", "used_blocks", "blocks"), 0)
        for runner in list(self._runners.values()):
            blocks = runner.blocks
            stats["queries"] += blocks.stats.queries
            stats["hits"] += blocks.stats.hits
            stats["preemptions"] += runner.num_preemptions
            stats["used_blocks"] += blocks.num_used
            stats["blocks"] += blocks.num_blocks
        return stats

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread (the leader's loop, or a follower's); a no-op while it runs. A thread on
        its way out (stopped) is waited for first, so that what was submitted meanwhile is served."""
        while True:
            with self._cond:
                old = self._thread
                if old is None or not old.is_alive():
                    self._stopping = False
                    target = self._lead if self.channel.leader else self.follow
                    self._thread = threading.Thread(target=target, name="eagle-engine", daemon=True)
                    self._thread.start()
                    return
                if not self._stopping:
                    return
            old.join()

    def stop(self, timeout: float = 30.0) -> None:
        """End the engine thread (every rank's, under tensor parallelism): requests still waiting or running
        fail; a later :meth:`submit` starts it again."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request, deliver: Callable[[Output], None],
               max_queue: int | None = None) -> Handle:
        """Queue ``request`` (starting the engine thread if needed). Raises :class:`QueueFullError` when
        ``max_queue`` requests already wait, :class:`InvalidRequestError` when it cannot fit the model."""
        return self.submit_all([request], [deliver], max_queue)[0]

    def submit_all(self, requests: list[Request], delivers: list[Callable[[Output], None]],
                   max_queue: int | None = None) -> list[Handle]:
        """:meth:`submit` for several requests at once: queued together (a caller's batch starts together
        where slots allow), or none of them."""
        for request in requests:  # (runners are built on the engine thread only)
            room = self.max_model_len - len(request.prompt)
            if not request.prompt or room < 1:
                raise InvalidRequestError(
                    f"the prompt has {len(request.prompt)} tokens; the model's maximum length is "
                    f"{room + len(request.prompt)}, leaving no room to generate"
                )
        with self._cond:
            if max_queue is not None and len(self._waiting) + len(requests) > max_queue:
                raise QueueFullError(f"the request queue is full ({max_queue} waiting); retry later")
            handles = []
            for request, deliver in zip(requests, delivers):
                handle = Handle(request, deliver, self._next_id)
                self._next_id += 1
                self._handles[handle.id] = handle
                if self.channel.leader:
                    heapq.heappush(self._waiting, (handle.order(), handle))
                handles.append(handle)
            self._cond.notify_all()
        self.start()
        return handles

    def cancel(self, handle: Handle) -> None:
        """Stop ``handle`` at the next round boundary and free its slot (no further tokens are delivered)."""
        with self._cond:
            handle.cancelled = True
            self._cond.notify_all()

    # ---------------------------------------------------------------------------- engine thread: lead

    def _runner(self, speculative: bool):
        if speculative not in self._runners:
            self._runners[speculative] = self.runner_of(speculative)
        return self._runners[speculative]

    def _lead(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    idle = False
                    while not (self._stopping or self._waiting or self._running or self._finishes):
                        if not self._cond.wait(HEARTBEAT_SECONDS if self.channel.tp is not None else None):
                            idle = True  # an empty plan now and then: the other ranks know rank 0 lives
                            break
                    stopping = self._stopping
                plan = Plan(stop=True) if stopping else Plan() if idle else self._plan()
                try:
                    plan = self.channel.exchange(plan)
                except Exception as e:  # the other ranks are gone (a rank died, the launcher stops them)
                    log.exception("the plan could not reach the other ranks; the engine stops")
                    for a in plan.admit:
                        self._fail(self._handles[a.rid], e)
                    if self.on_broken is not None:
                        self.on_broken()
                    break
                try:
                    self._apply(plan)
                except Exception as e:  # a bug in the bookkeeping: fail what runs, keep the thread alive
                    log.exception("engine loop error; failing the running requests")
                    for h in list(self._running.values()):
                        self._fail(h, e)
                if stopping:
                    break
        self._fail_all(EagleError("the engine stopped"))

    def _plan(self) -> Plan:
        """The next iteration: ended requests out (each once), waiting ones into the slots they free."""
        plan = Plan(finish=self._finishes)
        self._finishes = []
        now = time.perf_counter()
        ending = {rid for rid, _ in plan.finish}
        for h in list(self._running.values()):
            if h.cancelled and h.finished is None and h.id not in ending:
                plan.finish.append((h.id, "cancelled"))
                ending.add(h.id)
        freed = {True: 0, False: 0}
        for h in self._running.values():  # slots the plan's ends free (the runner's own ends are free)
            if h.id in ending and self._runner(h.request.speculative).holds(h.seq):
                freed[h.request.speculative] += 1
        free = {spec: None for spec in (True, False)}
        room = {spec: 0 for spec in (True, False)}  # blocks admissions may take (see Runner.admission_room)
        with self._cond:
            waiting, self._waiting = sorted(self._waiting), []  # (the queue's depth is read under the lock)
            for order, h in waiting:
                try:
                    if h.cancelled:  # never started: counted and told
                        self._finished(h, Output([], "", "cancelled", len(h.request.prompt)))
                    elif h.deadline is not None and now > h.deadline:
                        error = QueueTimeoutError(f"no free slot within the timeout ({h.request.timeout} s)")
                        self._finished(h, Output([], "", "timeout", len(h.request.prompt), error=error))
                    else:
                        spec = h.request.speculative
                        runner = self._runner(spec)  # (built on first use: memory may run out)
                        if free[spec] is None:
                            free[spec] = runner.free_slots() + freed[spec]
                            room[spec] = runner.admission_room()
                        prompt = h.request.prompt
                        runner.check_fits(len(prompt), h.request.max_tokens)
                        cost = runner.admission_cost(prompt)
                        if free[spec] > 0 and cost <= room[spec]:
                            plan.admit.append(self._admission(h))
                            free[spec] -= 1
                            room[spec] -= cost
                        else:  # first come, first served: nothing behind it jumps ahead on this runner
                            free[spec] = 0
                            self._waiting.append((order, h))  # (sorted: still a heap)
                except Exception as e:  # this request cannot start: it fails, the others go on
                    self._fail(h, e)
        return plan

    def _admission(self, h: Handle) -> Admission:
        r = h.request
        seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**63)
        return Admission(h.id, r.speculative, tuple(r.prompt), r.params, r.max_tokens, r.stop_ids, seed)

    # -------------------------------------------------------------------------- engine thread: follow

    def follow(self) -> None:
        """A follower's loop (ranks > 0 under tensor parallelism): apply the leader's plans until one says
        stop. Runs as the engine thread (the Python API: this rank's callers submit what rank 0's do), or on
        the calling thread with ``local_submissions = False`` (``eagle serve``'s other ranks: requests come
        from the plans alone)."""
        with torch.inference_mode():
            while True:
                try:
                    plan = self.channel.exchange(None)
                except Exception:  # rank 0 is gone
                    log.exception("follower: the leader's plans stopped coming; the engine stops")
                    break
                try:
                    self._apply(plan)
                except Exception:
                    log.exception("follower: applying a plan failed")
                if plan.stop:
                    break
        self._fail_all(EagleError("the engine stopped"))

    def _follower_handle(self, a: Admission) -> Handle:
        """The local handle of an admitted request: with ``local_submissions`` (the Python API under tensor
        parallelism, where every rank submits alike, in the same order) the one this rank's caller submitted,
        waited for if the caller is not there yet; else (the server's other ranks) a silent one."""
        with self._cond:
            if self.local_submissions:
                while a.rid not in self._handles:
                    self._cond.wait()
                h = self._handles[a.rid]
                r = h.request
                if (list(a.prompt), a.max_new_tokens, a.params, a.speculative) == (
                        r.prompt, r.max_tokens, r.params, r.speculative):
                    return h
            request = Request(list(a.prompt), a.max_new_tokens, a.params, a.seed, a.stop_ids,
                              speculative=a.speculative)
            silent = Handle(request, lambda out: None, a.rid)
        if self.local_submissions:  # this rank's callers submitted in another order than rank 0's
            self._finished(h, Output([], "", "error", len(h.request.prompt), error=EagleError(
                "under tensor parallelism every rank must submit the same requests in the same order (one "
                "calling thread per rank); this rank's request did not match rank 0's")))
        with self._cond:
            self._handles[a.rid] = silent  # runs as rank 0 says, so the ranks stay in step
        return silent

    # --------------------------------------------------------------------------- engine thread: apply

    def _running_handle(self, rid: int) -> Handle | None:
        return next((h for h in self._running.values() if h.id == rid), None)

    def _apply(self, plan: Plan) -> None:
        for rid, reason in plan.finish:
            h = self._running_handle(rid)
            if h is not None:
                h.seq.finish(reason)
                self._leave(h)
                if h.finished is None:  # (a stop string or a failure on rank 0 told its caller there)
                    error = EagleError("the request failed on rank 0") if reason == "error" else None
                    self._finished(h, Output([], "", reason, len(h.request.prompt), h.sent, error))
        if plan.stop:
            return
        for spec in (True, False):
            joining = [a for a in plan.admit if a.speculative == spec]
            if joining:
                self._admit(spec, joining)
        for spec, runner in list(self._runners.items()):
            if any(h.request.speculative == spec for h in self._running.values()):
                self._step(runner)

    def _admit(self, spec: bool, admissions: list[Admission]) -> None:
        """Make the sequences of ``admissions`` and prefill them together (one step)."""
        joining = []
        for a in admissions:
            h = self._handles[a.rid] if self.channel.leader else self._follower_handle(a)
            try:
                runner = self._runner(spec)
                h.seq = Sequence(list(a.prompt), a.params, a.max_new_tokens, a.stop_ids, a.seed,
                                 runner.max_model_len)
            except Exception as e:  # (every rank fails it alike)
                self._fail(h, e)
                continue
            h.admitted = time.perf_counter()
            self._observe("admitted", h)
            joining.append(h)
        if not joining:
            return
        t0 = time.perf_counter()
        try:
            first = runner.add([h.seq for h in joining])
        except Exception as e:
            if len(joining) == 1:
                self._fail(joining[0], e)
                return
            first = {}
            for h in joining:  # find the request that does not fit: add one at a time
                try:
                    first.update(runner.add([h.seq]))
                except Exception as e:
                    self._fail(h, e)
            joining = [h for h in joining if h.finished is None]
        for h in joining:
            self._running[h.seq] = h
        self._observe("round", "prefill", time.perf_counter() - t0, len(joining))
        self._deliver_all({h.seq: first.get(h.seq, []) for h in joining})

    def _step(self, runner) -> None:
        batch = [h for h in self._running.values() if runner.holds(h.seq)]
        t0 = time.perf_counter()
        try:
            kept = runner.step()
        except Exception as e:  # the round's state is unknown: its sequences fail, the scheduler goes on
            for h in batch:
                self._fail(h, e)
            return
        self._observe("round", "round", time.perf_counter() - t0, len(batch))
        self._deliver_all({h.seq: kept.get(h.seq, []) for h in batch})

    def _observe(self, event: str, *args) -> None:
        """Tell the observer (metrics), if any; a failing observer is logged, never fatal."""
        if self.observer is not None:
            try:
                getattr(self.observer, event)(*args)
            except Exception:
                log.exception("the scheduler's observer failed on %s", event)

    def _deliver_all(self, kept: dict) -> None:
        """Hand out the tokens ``add``/``step`` kept; the runner has already released the sequences they
        finished."""
        now = time.perf_counter()
        for seq, tokens in kept.items():
            h = self._running.get(seq)
            if h is None:
                continue
            if h.finished is not None:  # its caller was told (a stop string, a failure): the next plan
                if seq.done:  # ends it on every rank, unless the runner already did (on every rank)
                    self._running.pop(seq)
                continue
            try:
                out, stopped = h.advance(list(tokens))
                if stopped:  # a stop string: the sequence runs on until the next plan ends it everywhere
                    self._end_next_plan(h, "stop")
                elif out.finish_reason is not None:  # the runner ended it (on every rank alike)
                    self._leave(h)
                if out.token_ids:
                    self._observe("delivered", h, len(out.token_ids), now)  # (before last_token moves)
                    h.first_token = h.first_token or now
                    h.last_token = now
                if out.finish_reason is not None:
                    self._finished(h, out, deliver=False)
                h.deliver(out)
            except Exception as e:
                self._fail(h, e)

    def _finished(self, h: Handle, out: Output, deliver: bool = True) -> None:
        """Count a request that ended (any way), and tell its caller unless the caller is told by itself."""
        with self._cond:
            self._handles.pop(h.id, None)
        h.finished = time.perf_counter()
        self._observe("finished", h, out)
        if deliver:
            try:
                h.deliver(out)
            except Exception:
                log.exception("delivery to request %d failed", h.id)

    def _leave(self, h: Handle) -> None:
        """Take a finished request out of the batch and free its slot (if its runner has not already)."""
        if self._running.pop(h.seq, None) is None:
            return
        runner = self._runner(h.request.speculative)
        if runner.holds(h.seq):
            try:
                runner.release(h.seq)
            except Exception:
                log.exception("releasing request %d failed", h.id)

    def _end_next_plan(self, h: Handle, reason: str) -> None:
        """End a running request with the next plan, on every rank (the leader's host-side decisions: a
        stop string, a failure). A runner's membership changes only inside a plan, so the ranks stay in
        step."""
        if self.channel.leader and all(rid != h.id for rid, _ in self._finishes):
            self._finishes.append((h.id, reason))

    def _fail(self, h: Handle, error: BaseException, release: bool = False) -> None:
        """Fail ``h`` (once): its caller gets ``error`` now; a running sequence leaves its runner with the
        next plan, or now with ``release`` (the engine stopping, on every rank)."""
        if h.finished is not None:
            return
        if not isinstance(error, InvalidRequestError):
            log.warning("request %d failed: %s: %s", h.id, type(error).__name__, error)
        if h.seq is not None:
            if release:
                h.seq.finish("error")
                self._leave(h)
            else:
                self._end_next_plan(h, "error")
        tokens = 0 if h.seq is None else h.sent
        self._finished(h, Output([], "", "error", len(h.request.prompt), tokens, error))

    def _fail_all(self, error: BaseException) -> None:
        """The engine stops: everything waiting or running fails, and the runners are emptied."""
        with self._cond:
            waiting = [h for _, h in self._waiting]
            self._waiting.clear()
        for h in list(self._running.values()):
            self._fail(h, error, release=True)
            if h.seq in self._running:  # told before (a stop string): still leaves its runner
                h.seq.finish("stop")
                self._leave(h)
        for h in waiting:
            self._fail(h, error)


__all__ = ["Scheduler", "QueueFullError", "QueueTimeoutError", "KVCacheTooSmallError", "Request", "Output",
           "Handle"]
