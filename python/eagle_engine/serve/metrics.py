"""Prometheus metrics of one server, in its own ``CollectorRegistry`` (several apps can share a process).

The scheduler's observer (its calls come on the engine thread): what ran (rounds, prefills, batch sizes),
and each request's life: queue time, time to first token, inter-token latency, time per output token,
end-to-end latency, and how it finished (cancellations from the queue included). The latency names follow
the ones vLLM and SGLang users chart.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0,
               20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Metrics:
    """The scheduler's observer (``round``, ``admitted``, ``delivered``, ``finished``) and the registry."""

    def __init__(self, scheduler_state):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "eagle_requests", "Ended requests by finish reason (cancelled and timeout: from the queue too)",
            ["finish_reason"], registry=r,
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
        self.queue_seconds = Histogram(
            "eagle_request_queue_seconds", "From entering the queue to the start of the prefill",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "eagle_time_to_first_token_seconds", "From arrival (before tokenizing) to the first token",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "eagle_inter_token_latency_seconds",
            "Between consecutive tokens of a request (a round's tokens share its interval evenly)",
            buckets=ITL_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "eagle_time_per_output_token_seconds",
            "Per finished request: (last token - first token) / (tokens - 1)", buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "eagle_e2e_request_latency_seconds",
            "From arrival (before tokenizing) to the end of a finished request",
            buckets=E2E_BUCKETS, registry=r,
        )
        self._lock = threading.Lock()
        self._accepted = self._rounds = 0
        r.register(_CacheCollector(scheduler_state))

    def mean_acceptance_length(self) -> float:
        with self._lock:
            return self._accepted / self._rounds if self._rounds else 0.0

    # ------------------------------------------------------------------------------------ the observer

    def round(self, kind: str, seconds: float, batch: int) -> None:
        if kind == "prefill":
            self.prefill_seconds.observe(seconds)
        else:
            self.round_seconds.observe(seconds)
            self.batch_size.observe(batch)

    def admitted(self, handle) -> None:
        self.queue_seconds.observe(handle.admitted - handle.submitted)

    def delivered(self, handle, n_tokens: int, now: float) -> None:
        """``n_tokens`` new tokens of ``handle`` at ``now`` (``handle.last_token``: the previous delivery)."""
        previous = handle.last_token
        if previous is None:  # the first token(s): the prefill's
            self.ttft.observe(now - handle.arrived)
            n_tokens -= 1
            previous = now
        for _ in range(n_tokens):
            self.itl.observe((now - previous) / max(n_tokens, 1))

    def finished(self, handle, output) -> None:
        self.requests.labels(output.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(output.prompt_tokens)
        self.generation_tokens.inc(output.completion_tokens)
        if output.finish_reason in ("stop", "length"):
            self.e2e.observe(handle.finished - handle.arrived)
            if handle.first_token is not None and output.completion_tokens > 1:
                self.tpot.observe((handle.last_token - handle.first_token) / (output.completion_tokens - 1))
        seq = handle.seq
        lengths = list(getattr(seq, "accept_lengths", None) or []) if seq is not None else []
        if lengths:
            self.verify_rounds.inc(len(lengths))
            self.accepted_tokens.inc(sum(lengths))
            with self._lock:
                self._rounds += len(lengths)
                self._accepted += sum(lengths)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The KV cache's state, read from the scheduler's runners at each scrape (a plain read of counters the
    engine thread updates): prefix-cache queries and hits in prompt tokens, preemptions, blocks in use."""

    def __init__(self, scheduler_state):
        self.scheduler_state = scheduler_state

    def collect(self):
        stats = self.scheduler_state().cache_stats()
        used = stats["used_blocks"] / stats["blocks"] if stats["blocks"] else 0.0
        return [
            CounterMetricFamily("eagle_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                value=stats["queries"]),
            CounterMetricFamily("eagle_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                value=stats["hits"]),
            CounterMetricFamily("eagle_num_preemptions", "Sequences preempted for want of KV cache blocks",
                                value=stats["preemptions"]),
            GaugeMetricFamily("eagle_kv_cache_usage", "Fraction of the KV cache blocks in use", value=used),
            GaugeMetricFamily("eagle_kv_cache_blocks", "KV cache blocks in the pools", value=stats["blocks"]),
        ]
