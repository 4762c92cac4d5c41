"""Prometheus metrics of one server, in its own ``CollectorRegistry`` (several apps can share a process)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """``observe_round`` and ``observe_finish`` are the scheduler's observers (engine thread)."""

    def __init__(self, scheduler_state):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "eagle_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "eagle_requests_rejected", "Requests answered 4xx/5xx", ["status"], registry=r
        )
        self.prompt_tokens = Counter("eagle_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("eagle_generation_tokens", "Tokens generated", registry=r)
        self.verify_rounds = Counter(
            "eagle_verify_rounds", "Target verification forwards (EAGLE)", registry=r
        )
        self.accepted_tokens = Counter(
            "eagle_accepted_tokens", "Tokens produced by verification forwards, bonus included", registry=r
        )
        queue = Gauge("eagle_queue_depth", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: scheduler_state().queue_depth)
        running = Gauge("eagle_running_batch", "Sequences in the running batch", registry=r)
        running.set_function(lambda: scheduler_state().num_running)
        mean = Gauge(
            "eagle_mean_acceptance_length",
            "Mean tokens per verification forward over finished requests (0 before any)",
            registry=r,
        )
        mean.set_function(self.mean_acceptance_length)
        self.round_seconds = Histogram(
            "eagle_round_seconds", "Wall time of one decoding round", buckets=ROUND_BUCKETS, registry=r
        )
        self.prefill_seconds = Histogram(
            "eagle_prefill_seconds", "Wall time of one prefill step", buckets=ROUND_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "eagle_round_batch_size",
            "Sequences per decoding round",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self._lock = threading.Lock()
        self._accepted = self._rounds = 0

    def mean_acceptance_length(self) -> float:
        with self._lock:
            return self._accepted / self._rounds if self._rounds else 0.0

    def observe_round(self, kind: str, seconds: float, batch: int) -> None:
        if kind == "prefill":
            self.prefill_seconds.observe(seconds)
        else:
            self.round_seconds.observe(seconds)
            self.batch_size.observe(batch)

    def observe_finish(self, handle, output) -> None:
        self.requests.labels(output.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(output.prompt_tokens)
        self.generation_tokens.inc(output.completion_tokens)
        lengths = list(getattr(handle.seq, "accept_lengths", None) or [])
        if lengths:
            self.verify_rounds.inc(len(lengths))
            self.accepted_tokens.inc(sum(lengths))
            with self._lock:
                self._rounds += len(lengths)
                self._accepted += sum(lengths)

    def render(self) -> bytes:
        return generate_latest(self.registry)
