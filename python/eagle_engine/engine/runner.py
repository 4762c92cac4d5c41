"""The runner: owns the caches for ``max_batch_size`` sequences of up to ``max_model_len`` tokens, lets
sequences join (prefill) and leave between steps, and runs each step with one device-to-host transfer.

Sequences occupy slots ``0 .. n - 1`` (a sequence that finishes frees its slot; the last one moves into the
hole, so running sequences stay packed and finished ones stop drafting). A step runs over the smallest batch
bucket holding them, as one CUDA graph per bucket and mode on a GPU, eagerly elsewhere — the same code. All
calls must come from one thread, and one user at a time: while ``eagle serve``'s scheduler owns the runner,
the engine's own ``generate`` must not be called on it.
"""

from __future__ import annotations

import time
import warnings

import torch

import eagle_kernels as ops

from ..errors import EagleError, InvalidRequestError
from ..models.llama import LlamaModel
from ..speculative.drafter import Drafter
from .batch import BatchState, Mode, prefill, speculative_round, vanilla_step
from .graphs import GraphCache
from .sequence import Sequence


def batch_buckets(max_batch_size: int) -> list[int]:
    """Graph batch sizes: 1, 2, 4, 8, ... up to and including ``max_batch_size``."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


class Runner:
    """Runs prefills and decoding steps (speculative rounds with a drafter, else vanilla steps) for the
    sequences that :meth:`add` took in; :meth:`step` returns each one's new kept tokens."""

    def __init__(
        self,
        target: LlamaModel,
        drafter: Drafter | None = None,
        *,
        max_batch_size: int,
        max_model_len: int,
        cuda_graphs: bool = False,
    ):
        if max_batch_size < 1:
            raise EagleError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 2 <= max_model_len <= target.config.max_length:
            raise EagleError(
                f"max_model_len must be in [2, {target.config.max_length}] (the model's maximum length), "
                f"got {max_model_len}"
            )
        self.target, self.drafter = target, drafter
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.device = target.lm_head_weight.device
        target.fuse()
        if drafter is not None:
            drafter.fuse()
        self.state = BatchState(target, drafter, max_batch_size, max_model_len)
        positions = self.state.tcache.capacity + 1
        target.ensure_positions(positions)
        if drafter is not None:
            drafter.ensure_positions(positions)
        self.running: list[Sequence] = []  # running[i] holds slot i
        if cuda_graphs and ops.reference_forced():
            # The reference ops synchronise with the host inside a step (data-dependent shapes): no capture.
            warnings.warn("EAGLE_KERNELS_BACKEND=reference: CUDA graphs are off", stacklevel=2)
            cuda_graphs = False
        # Batch sizes a step is padded to (None: the running count). Graphs need them; setting them on an
        # eager runner runs the same shapes as a graph runner (e.g. to compare the two exactly).
        self.buckets = batch_buckets(max_batch_size) if cuda_graphs else None
        self.graphs = GraphCache(self.device, enabled=cuda_graphs and self.device.type == "cuda")
        pin = self.device.type == "cuda"
        self.host_out = torch.zeros(self.state.out.shape, dtype=torch.long, pin_memory=pin)

    # ------------------------------------------------------------------------------------- membership

    def free_slots(self) -> int:
        return self.max_batch_size - len(self.running)

    def has_running(self) -> bool:
        return bool(self.running)

    def add(self, seqs: list[Sequence]) -> dict[Sequence, list[int]]:
        """Prefill ``seqs`` into free slots (they join the running batch); returns each one's first kept
        tokens. Raises :class:`InvalidRequestError` when a prompt leaves no room below ``max_model_len``."""
        if len(seqs) > self.free_slots():
            raise EagleError(f"{len(seqs)} sequences do not fit: {self.free_slots()} free slot(s)")
        for seq in seqs:
            if len(seq.prompt) >= self.max_model_len:
                raise InvalidRequestError(
                    f"the prompt has {len(seq.prompt)} tokens; max_model_len is {self.max_model_len}, "
                    "leaving no room to generate"
                )
        seqs = [q for q in seqs if not q.done]
        if not seqs:
            return {}
        t0 = time.perf_counter()
        start = len(self.running)
        s, sl = self.state, slice(start, start + len(seqs))
        self.running.extend(seqs)
        s.temperature[sl] = torch.tensor([float(q.params.temperature) for q in seqs])
        s.top_p[sl] = torch.tensor([float(q.params.top_p) for q in seqs])
        s.top_k[sl] = torch.tensor([q.params.top_k for q in seqs])
        s.seeds[sl] = torch.tensor([q.seed for q in seqs])
        s.offsets[sl] = 0
        longest = max(len(q.prompt) for q in seqs)
        ids = torch.tensor([q.prompt + [0] * (longest - len(q.prompt)) for q in seqs]).to(self.device)
        lens = torch.tensor([len(q.prompt) for q in seqs], dtype=torch.int32).to(self.device)
        try:
            first = prefill(self.target, s, start, ids, lens, self._mode(seqs)).tolist()
        except BaseException:
            del self.running[start:]  # nothing joined: the slots stay free
            raise
        s.active[sl] = True
        elapsed = time.perf_counter() - t0
        kept = {}
        for q, tok in zip(seqs, first):
            q.prefill_seconds = elapsed
            kept[q] = q.append([tok])
        self._release_done()
        return kept

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s slot now (it need not be done); the last running sequence moves into it."""
        slot = self.running.index(seq)
        last = len(self.running) - 1
        if slot != last:
            self._move(last, slot)
        self.running.pop()
        # A finished sequence may have committed rows past its limit; a free slot still runs in a padded
        # bucket, so it must not keep a length near the end of the cache.
        self.state.active[last] = False
        for cache in self.state.caches():
            cache.lengths[last] = 0

    def _release_done(self) -> None:
        for seq in [q for q in self.running if q.done]:
            self.release(seq)

    def _move(self, src: int, dst: int) -> None:
        """Move the sequence in slot ``src`` to slot ``dst``: its committed cache rows and per-slot state."""
        seq, s = self.running[src], self.state
        rows = seq.committed_length
        for cache in s.caches():
            cache.data[:, :, dst, :, :rows] = cache.data[:, :, src, :, :rows]
        for buf in s.per_slot():
            buf[dst] = buf[src]
        self.running[dst] = seq

    # ------------------------------------------------------------------------------------------ steps

    def _mode(self, seqs: list[Sequence]) -> Mode:
        sampled = [q.params for q in seqs if not q.params.greedy]
        if not sampled:
            return Mode()
        top_k, top_p = max(p.top_k for p in sampled), any(p.top_p < 1 for p in sampled)
        # Graphs are keyed by the mode: round top-k up to a power of two so few keys ever exist.
        top_k = 1 << (top_k - 1).bit_length() if top_k else 0
        return Mode(greedy=False, max_top_k=top_k, top_p=top_p)

    def step(self) -> dict[Sequence, list[int]]:
        """One speculative round (or one vanilla step without a drafter) over every running sequence; returns
        each one's newly kept tokens. Sequences done afterwards — including those :meth:`Sequence.finish`
        ended before the step — leave the batch."""
        self._release_done()
        if not self.running:
            return {}
        t0 = time.perf_counter()
        n_run = len(self.running)
        n = n_run if self.buckets is None else next(b for b in self.buckets if b >= n_run)
        mode = self._mode(self.running)
        if self.drafter is None:
            self.graphs.run(("vanilla", n, mode), lambda: vanilla_step(self.target, self.state, n, mode))
        else:
            fn = lambda: speculative_round(self.target, self.state, n, mode)  # noqa: E731
            self.graphs.run((self.drafter.method, n, mode), fn)
        rows = self._read_out(n_run)
        elapsed = time.perf_counter() - t0
        kept = {}
        w = self.state.width
        for seq, row in zip(self.running, rows):
            seq.decode_seconds += elapsed
            kept[seq] = seq.append(row[: row[w]])
            if self.drafter is not None:
                seq.accept_lengths.append(len(kept[seq]))
        self._release_done()
        return kept

    def _read_out(self, n: int) -> list[list[int]]:
        """The round's one device-to-host transfer: ``out[:n]`` into pinned memory, then one wait."""
        host = self.host_out[:n]
        host.copy_(self.state.out[:n], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return host.tolist()
