"""The runner: owns the caches for ``max_batch_size`` sequences of up to ``max_model_len`` tokens, lets
sequences join (prefill) and leave between steps, and runs each step with one device-to-host transfer.

Sequences occupy slots ``0 .. n - 1`` (a sequence that finishes frees its slot; the last one moves into the
hole, so running sequences stay packed and finished ones stop drafting); their KV rows live in blocks of
a paged pool, listed by each slot's row of the block table (a move copies the row, not the KV). A step
runs over the smallest batch bucket holding them, as one CUDA graph per bucket and mode on a GPU, eagerly
elsewhere — the same code. All calls must come from one thread, and one user at a time: while
``eagle serve``'s scheduler owns the runner, the engine's own ``generate`` must not be called on it.
"""

from __future__ import annotations

import time
import warnings

import torch

import eagle_kernels as ops

from ..errors import EagleError, InvalidRequestError
from ..models.llama import LlamaModel
from ..speculative.drafter import Drafter
from .batch import BatchState, Mode, prefill, prefill_chunk, speculative_round, vanilla_step
from .blocks import BlockManager, KVCacheTooSmallError, OutOfBlocks
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
    sequences that :meth:`add` took in; :meth:`step` returns each one's new kept tokens.

    The caches are paged (:mod:`eagle_engine.kv_cache`): ``num_blocks`` blocks of ``block_size`` rows
    (default: enough for every slot's ``max_model_len``), handed out by a :class:`BlockManager` as
    sequences grow, with ``prefix_caching`` reusing the blocks of prompt prefixes seen before. A prompt is
    prefilled ``max_prefill_tokens`` rows at a time at most per step (chunked prefill: a long prompt joins
    over several steps while the others keep decoding; it stays inactive until its last chunk). When the
    running sequences need more blocks than are free, the newest is preempted: its blocks are freed, and it
    resumes (recomputed from its tokens, with the same sampling stream) when blocks are free again.
    """

    def __init__(
        self,
        target: LlamaModel,
        drafter: Drafter | None = None,
        *,
        max_batch_size: int,
        max_model_len: int,
        cuda_graphs: bool = False,
        num_blocks: int | None = None,
        block_size: int = 16,
        prefix_caching: bool = False,
        max_prefill_tokens: int | None = None,
    ):
        if max_batch_size < 1:
            raise EagleError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 2 <= max_model_len <= target.config.max_length:
            raise EagleError(
                f"max_model_len must be in [2, {target.config.max_length}] (the model's maximum length), "
                f"got {max_model_len}"
            )
        for name, value in (("block_size", block_size), ("num_blocks", num_blocks),
                            ("max_prefill_tokens", max_prefill_tokens)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EagleError(f"{name} must be an integer >= 1, got {value!r}")
        self.target, self.drafter = target, drafter
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.max_prefill_tokens = max_prefill_tokens or max_model_len
        self.device = target.lm_head_weight.device
        target.fuse()
        if drafter is not None:
            drafter.fuse()
        self.state = BatchState(target, drafter, max_batch_size, max_model_len, num_blocks, block_size)
        self.blocks = BlockManager(self.state.pool.num_blocks, block_size, prefix_caching)
        positions = self.state.tcache.capacity + 1
        target.ensure_positions(positions)
        if drafter is not None:
            drafter.ensure_positions(positions)
        self.running: list[Sequence] = []  # running[i] holds slot i (prefilling ones too)
        self.prefilling: dict[Sequence, int] = {}  # a prompt part-way in: the rows computed so far
        self.preempted: list[Sequence] = []  # out of the pool, to resume in this order
        self.num_preemptions = 0
        self._resume_offsets: dict[Sequence, int] = {}  # a preempted sequence's sampling stream position
        self._budget = self.max_prefill_tokens  # prefill rows this step may still compute
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
        # The block table's host copy: kept up to date entry by entry, copied to the device before a step.
        shape = self.state.pool.block_table.shape
        self.host_table = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        self._table = self.host_table.numpy()  # host bookkeeping through numpy: no torch op, no launch
        # What a round reads: the table with the rows of slots part-way through their prefill hidden (-1).
        self.round_table = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        self._round_table = self.round_table.numpy()

    # ------------------------------------------------------------------------------------- membership

    @property
    def scratch_rows(self) -> int:
        """Rows a step may write past a sequence's committed length."""
        return self.state.scratch_rows

    def free_slots(self) -> int:
        return self.max_batch_size - len(self.running) - len(self.preempted)

    def has_running(self) -> bool:
        return bool(self.running or self.preempted)

    def holds(self, seq: Sequence) -> bool:
        """Whether ``seq`` is in this runner: running, prefilling or preempted."""
        return seq in self.running or seq in self.preempted

    def blocks_needed(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` committed tokens holds during a step."""
        return self.blocks.blocks_for(tokens + self.scratch_rows)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise :class:`KVCacheTooSmallError` unless one request could run to its end in an otherwise
        empty pool."""
        longest = min(prompt_len + max_new_tokens, self.max_model_len)
        if self.blocks_needed(longest) > self.blocks.num_blocks:
            raise KVCacheTooSmallError(
                f"the request ({prompt_len} prompt tokens, up to {max_new_tokens} new) needs "
                f"{self.blocks_needed(longest)} KV cache blocks of {self.blocks.block_size} tokens; the pool "
                f"has {self.blocks.num_blocks}: raise kv_cache_memory (--kv-cache-memory)"
            )

    def admission_cost(self, prompt: list[int]) -> int:
        """Blocks admitting ``prompt`` takes from the free ones now (its cached prefix excepted)."""
        return self.blocks.cost(prompt, len(prompt) + self.scratch_rows)

    def admission_room(self) -> int:
        """Blocks admissions may take now: none while a preempted sequence waits to resume (it comes first);
        with sequences running, a watermark of 1% stays free for them to grow into (an empty pool takes any
        request that :meth:`check_fits`)."""
        if self.preempted:
            return 0
        watermark = max(1, self.blocks.num_blocks // 100) if self.running else 0
        return self.blocks.num_free - watermark

    def add(self, seqs: list[Sequence]) -> dict[Sequence, list[int]]:
        """Admit ``seqs`` into free slots (they join the running batch); returns the first kept tokens of
        those prefilled whole now. Prompts longer than this step's prefill budget are prefilled chunk by
        chunk by the next steps. Raises :class:`InvalidRequestError` when a prompt leaves no room below
        ``max_model_len``, :class:`OutOfBlocks` when the pool cannot take them (then none joins)."""
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
        starts = self._take_blocks(seqs)
        start = self._join(seqs, starts)
        # The leading run that fits this step's budget is prefilled together; the rest in later steps.
        whole = 0
        for q, rows in zip(seqs, starts):
            if len(q.prompt) - rows > self._budget:
                break
            self._budget -= len(q.prompt) - rows
            whole += 1
        try:
            kept = self._prefill(seqs[:whole], start) if whole else {}
        except BaseException:
            for q in seqs:  # nothing joined: the slots and blocks are free again
                self.release(q)
            raise
        self._release_done()
        return kept

    def _join(self, seqs: list[Sequence], cached: list[int]) -> int:
        """``seqs`` (holding their blocks) take the next slots, inactive, as prompts part-way in with
        ``cached`` rows computed: their table rows and sampling settings are written. Returns the first
        slot."""
        start = len(self.running)
        self.running.extend(seqs)
        self._write_tables(seqs, start)
        s, sl = self.state, slice(start, start + len(seqs))
        s.temperature[sl] = torch.tensor([float(q.params.temperature) for q in seqs])
        s.top_p[sl] = torch.tensor([float(q.params.top_p) for q in seqs])
        s.top_k[sl] = torch.tensor([q.params.top_k for q in seqs])
        s.seeds[sl] = torch.tensor([q.seed for q in seqs])
        s.offsets[sl] = torch.tensor([self._resume_offsets.get(q, 0) for q in seqs])
        s.active[sl] = False
        for q, rows in zip(seqs, cached):
            self.prefilling[q] = rows
        return start

    def _take_blocks(self, seqs: list[Sequence]) -> list[int]:
        """Blocks for ``seqs``' contexts (their cached prefixes shared); returns the rows already cached."""
        cached = []
        for q in seqs:
            context = self._context(q)
            rows, copy = self.blocks.match_prefix(q, context)
            if copy is not None:  # a partly filled cached block: this sequence writes into its own copy
                for cache in self.state.caches():
                    cache.data[:, :, copy[1]] = cache.data[:, :, copy[0]]
            if not self.blocks.grow(q, len(context) + self.scratch_rows):
                for taken in seqs[: len(cached) + 1]:
                    self.blocks.release(taken)
                raise OutOfBlocks(
                    f"the KV cache has {self.blocks.num_free} free block(s) of {self.blocks.block_size} "
                    f"rows: too few for {len(seqs)} joining sequence(s)"
                )
            cached.append(rows)
        return cached

    @staticmethod
    def _context(seq: Sequence) -> list[int]:
        """The tokens whose rows a (re)starting sequence computes: its prompt, and when it resumes after a
        preemption, the tokens it emitted but the last (the last is its root, whose row comes next)."""
        return seq.prompt + seq.tokens[:-1]

    def _write_tables(self, seqs: list[Sequence], start: int) -> None:
        for slot, q in enumerate(seqs, start):
            blocks = self.blocks.blocks(q)
            self._table[slot] = -1
            self._table[slot, : len(blocks)] = blocks

    def _grow(self, seq: Sequence, slot: int, rows: int) -> bool:
        before = len(self.blocks.blocks(seq))
        if not self.blocks.grow(seq, rows):
            return False
        blocks = self.blocks.blocks(seq)
        if len(blocks) > before:
            self._table[slot, before : len(blocks)] = blocks[before:]
        return True

    def _sync_table(self, start: int, stop: int, source: torch.Tensor | None = None) -> None:
        """The device block table's rows ``start .. stop - 1`` from the host copy: the round's own buffer
        without a wait (nothing writes it until the round has been read back), the live host table with one
        (a prefill: later bookkeeping in the same step may change those rows)."""
        blocking = source is None
        source = self.host_table if source is None else source
        self.state.pool.block_table[start:stop].copy_(source[start:stop], non_blocking=not blocking)

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s slot and blocks now (it need not be done); the last running sequence moves into
        its slot. A preempted sequence just leaves the resume queue."""
        if seq in self.preempted:
            self.preempted.remove(seq)
            self._resume_offsets.pop(seq, None)
            return
        slot = self.running.index(seq)
        last = len(self.running) - 1
        if slot != last:
            self._move(last, slot)
        self.running.pop()
        self.prefilling.pop(seq, None)
        self.blocks.release(seq)
        # A free slot still runs in a padded bucket: no length near the end of the table, no blocks.
        self.state.active[last] = False
        self._table[last] = -1
        for cache in self.state.caches():
            cache.lengths[last] = 0

    def _release_done(self) -> None:
        for seq in [q for q in self.running if q.done]:
            self.release(seq)

    def _move(self, src: int, dst: int) -> None:
        """Move the sequence in slot ``src`` to slot ``dst``: its table row (its blocks stay where they are)
        and per-slot state."""
        s = self.state
        self._table[dst] = self._table[src]
        for buf in s.per_slot():
            buf[dst] = buf[src]
        self.running[dst] = self.running[src]

    # ------------------------------------------------------------------------------ prefill, preemption

    def _prefill(self, seqs: list[Sequence], start: int, known_first: bool = False) -> dict:
        """The last (or only) prefill of ``seqs`` in slots ``start ..``: the rows after those computed so far
        (``self.prefilling``) to each context's end; they become active. ``known_first``: resuming sequences
        whose root is their last emitted token (nothing new is kept)."""
        t0 = time.perf_counter()
        contexts = [self._context(q) for q in seqs]
        rows = [self.prefilling[q] for q in seqs]
        longest = max(len(c) for c in contexts)
        width = max(len(c) - r for c, r in zip(contexts, rows))
        s, sl = self.state, slice(start, start + len(seqs))
        self._sync_table(sl.start, sl.stop)
        ids = torch.tensor([c + [0] * (longest - len(c)) for c in contexts]).to(self.device)
        lens = torch.tensor([len(c) for c in contexts], dtype=torch.int32).to(self.device)
        starts = torch.tensor(rows, dtype=torch.int32).to(self.device)
        roots = torch.tensor([q.tokens[-1] for q in seqs]).to(self.device) if known_first else None
        # Each sequence's sampling stream starts (or resumes) here: rounds it sat out inactive drew from it.
        offsets = torch.tensor([self._resume_offsets.get(q, 0) for q in seqs])
        s.offsets[sl] = offsets
        first = prefill(self.target, s, start, ids, lens, self._mode(seqs), starts, width, roots).tolist()
        s.active[sl] = True
        elapsed = time.perf_counter() - t0
        kept = {}
        for q, tok, context in zip(seqs, first, contexts):
            self.prefilling.pop(q)
            self.blocks.register_prefix(q, context)
            q.prefill_seconds += elapsed
            if not known_first:
                kept[q] = q.append([tok])
        if known_first:  # the prefill's draw is not used: the stream goes on from where it stopped
            s.offsets[sl] = offsets
            for q in seqs:
                self._resume_offsets.pop(q, None)
        return kept

    def _continue_prefills(self) -> dict[Sequence, list[int]]:
        """Spend this step's prefill budget on the prompts part-way in, oldest first: a chunk, or the last
        part and the first token (one sequence per prefill)."""
        kept = {}
        for q in sorted(self.prefilling, key=lambda q: q.id):
            if self._budget <= 0:
                break
            slot, done = self.running.index(q), self.prefilling[q]
            context = self._context(q)
            if len(context) - done <= self._budget:
                self._budget -= len(context) - done
                kept.update(self._prefill([q], slot, known_first=bool(q.tokens)))
            else:
                end = done + self._budget
                self._budget = 0
                self._sync_table(slot, slot + 1)
                ids = torch.tensor([context]).to(self.device)
                prefill_chunk(self.target, self.state, slot, ids, done, end)
                self.prefilling[q] = end
        return kept

    def _preempt(self, seq: Sequence) -> None:
        """Take ``seq`` out of the pool; it resumes when blocks are free (:meth:`_resume`)."""
        slot = self.running.index(seq)
        if seq in self.prefilling:  # its stream has not moved since it stopped (rounds it sat out drew too)
            offset = self._resume_offsets.get(seq, 0)
        else:
            offset = int(self.state.offsets[slot])  # (a host read: preemption is rare)
        self.release(seq)
        self._resume_offsets[seq] = offset
        self.preempted.append(seq)
        self.preempted.sort(key=lambda q: q.id)  # the oldest resumes first
        self.num_preemptions += 1

    def _resume(self) -> None:
        """Bring preempted sequences back, oldest first, while slots and blocks allow (each is then
        prefilled again, from its cached prefix, with the next prefill budget)."""
        while self.preempted and len(self.running) < self.max_batch_size:
            q = self.preempted[0]
            context = self._context(q)
            if self.blocks.cost(context, len(context) + self.scratch_rows) > self.blocks.num_free:
                return
            self.preempted.pop(0)
            self._join([q], self._take_blocks([q]))

    def _ensure_blocks(self) -> None:
        """Blocks for every decoding sequence's rows this step (committed + scratch); when the pool runs
        short, the newest sequence is preempted, until the rest fit."""
        while True:
            short = None
            for slot, q in enumerate(self.running):
                rows = q.committed_length + self.scratch_rows
                if q not in self.prefilling and not self._grow(q, slot, rows):
                    short = q
                    break
            if short is None:
                return
            victim = max(self.running, key=lambda q: q.id)
            self._preempt(victim)

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
        """One speculative round (or one vanilla step without a drafter) over every running sequence, after
        the prefill work this step's budget allows (resumed and part-way prompts); returns each one's newly
        kept tokens. Sequences done afterwards — including those :meth:`Sequence.finish` ended before the
        step — leave the batch."""
        self._release_done()
        self._resume()
        try:
            kept = self._continue_prefills()
            self._ensure_blocks()
            decoding = [q for q in self.running if q not in self.prefilling]
            if decoding:  # (a prompt finished above decodes in this round too: its tokens follow its first)
                for q, new in self._round().items():
                    kept.setdefault(q, []).extend(new)
        finally:
            self._budget = self.max_prefill_tokens
        self._release_done()
        return kept

    def _round(self) -> dict[Sequence, list[int]]:
        t0 = time.perf_counter()
        n_run = len(self.running)
        n = n_run if self.buckets is None else next(b for b in self.buckets if b >= n_run)
        masked = self._round_table
        masked[:n] = self._table[:n]
        for q in self.prefilling:  # (their lengths are 0 too: the round neither reads nor writes them)
            masked[self.running.index(q)] = -1
        self._sync_table(0, n, self.round_table)
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
            if seq in self.prefilling:
                continue
            seq.decode_seconds += elapsed
            kept[seq] = seq.append(row[: row[w]])
            if self.drafter is not None:
                seq.accept_lengths.append(len(kept[seq]))
        return kept

    def _read_out(self, n: int) -> list[list[int]]:
        """The round's one device-to-host transfer: ``out[:n]`` into pinned memory, then one wait."""
        host = self.host_out[:n]
        host.copy_(self.state.out[:n], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return host.tolist()
