"""The device side of decoding: every slot's state in static buffers, and the steps that run over them.

Each step works on the first ``n`` slots (views of buffers sized for ``max_batch_size``), reads nothing back
to the host, and writes what the host needs into ``out`` — so that the same code runs eagerly on a CPU and is
captured once per batch bucket into a CUDA graph on a GPU.

Invariants between steps, per slot ``b`` of a running sequence:
- the target cache holds ``lengths[b]`` committed rows; ``root_token[b]`` (the last emitted token) has no
  target KV yet;
- with a drafter that keeps history, ``history[b, :lengths[b] + 1]`` are the sequence's tokens, the root last;
- the drafter's own state (:mod:`eagle_engine.speculative.drafter`) describes the same committed tokens;
- a round's rows (target and draft) live past ``lengths[b]`` and are compacted or overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import eagle_kernels as ops

from ..kv_cache import PoolShape
from ..models.llama import LlamaModel
from ..speculative.drafter import Drafter, Verified, gather_rows
from ..speculative.sampling import probs_per_row, sample_from_probs, uniforms


@dataclass(frozen=True)
class Mode:
    """What the host knows about the running batch that changes the computation (and so the graph)."""

    greedy: bool = True  # every running sequence is greedy: argmax verification, no randoms
    max_top_k: int = 0  # largest top_k among sampled sequences (0: none)
    top_p: bool = False  # some sampled sequence has top_p < 1


def scratch_rows(drafter: Drafter | None) -> int:
    """Rows a step may write past a sequence's committed length: its tree (or its one vanilla row), and
    one more."""
    return (max(drafter.rows, drafter.width, drafter.cache_rows) if drafter is not None else 1) + 1


class BatchState:
    """Static device buffers for ``max_batch`` slots: the target cache, roots, per-slot sampling settings,
    outputs; the drafter's own buffers are allocated here too (:meth:`Drafter.bind`).

    The caches are paged (:mod:`eagle_engine.kv_cache`): a pool of ``num_blocks`` blocks of ``block_size``
    rows (default: enough for every slot's whole length) and one block table ``[max_batch, max_blocks]``
    for the target's cache and the drafter's, filled by the runner.
    ``scratch_rows``: rows a step may write past a sequence's committed length (its tree, and one more).
    The table is wide enough for ``2 * (max_len + scratch_rows)`` rows: a batched prefill pads each prompt's
    computed part to the longest, and those padding rows must stay inside the table (their entries are -1:
    the writes are dropped).

    ``out`` long ``[max_batch, width + 1]``: after a step, row ``b`` holds the tokens the step produced for
    slot ``b`` in ``[:width]`` and how many of them count in ``[width]`` (0 for an inactive slot).
    """

    def __init__(self, target: LlamaModel, drafter: Drafter | None, max_batch: int, max_len: int,
                 num_blocks: int | None = None, block_size: int = 16):
        dev = target.lm_head_weight.device
        self.max_batch, self.max_len = max_batch, max_len
        self.drafter = drafter
        # Path width: the root and the longest accepted path; vanilla emits one token.
        self.width = drafter.width if drafter is not None else 1
        self.scratch_rows = scratch_rows(drafter)
        rows = max_len + self.scratch_rows
        if num_blocks is None:
            num_blocks = max_batch * -(-rows // block_size)
        table = torch.full((max_batch, -(-2 * rows // block_size)), -1, dtype=torch.int32, device=dev)
        self.pool = PoolShape(num_blocks, block_size, table)
        self.tcache = target.allocate_cache(max_batch, self.pool.capacity, self.pool)

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        self.root_token = zeros(max_batch)
        self.active = zeros(max_batch, dtype=torch.bool)
        self.temperature = zeros(max_batch, dtype=torch.float32)
        self.top_p = zeros(max_batch, dtype=torch.float32)
        self.top_k = zeros(max_batch)
        self.seeds = zeros(max_batch)
        self.offsets = zeros(max_batch)
        self.out = zeros(max_batch, self.width + 1)
        # Full-batch arguments of kv_compact (it runs over the whole cache; rows past n count 0).
        self.compact_src = zeros(max_batch, self.width)
        self.compact_counts = zeros(max_batch, dtype=torch.int32)
        keeps_history = drafter is not None and drafter.needs_history
        self.history = zeros(max_batch, max_len + self.width + 1) if keeps_history else None
        if drafter is not None:
            drafter.bind(target, max_batch, max_len, self.pool)

    def per_slot(self) -> list[torch.Tensor]:
        """Every per-slot buffer (dimension 0 is the slot), for moving a sequence between slots."""
        bufs = [self.root_token, self.active, self.temperature, self.top_p, self.top_k]
        bufs += [self.seeds, self.offsets, self.tcache.lengths]
        bufs += [self.history] if self.history is not None else []
        return bufs + (self.drafter.per_slot() if self.drafter is not None else [])

    def caches(self) -> list:
        """Every per-slot KV cache (committed rows move with a sequence)."""
        return [self.tcache] + (self.drafter.caches() if self.drafter is not None else [])


def _next_tokens(s: BatchState, sl: slice, logits: torch.Tensor, mode: Mode) -> torch.Tensor:
    """One token per row of fp32 ``[n, V]`` logits under each slot's sampling settings."""
    if mode.greedy:
        return logits.argmax(-1)
    probs = probs_per_row(logits, s.temperature[sl], s.top_p[sl], s.top_k[sl], mode.max_top_k, mode.top_p)
    return sample_from_probs(probs, uniforms(s.seeds[sl], s.offsets[sl], 1)[:, 0])


def _forward_rows(target: LlamaModel, s: BatchState, sl: slice, ids: torch.Tensor, starts: torch.Tensor,
                  width: int):
    """The target over rows ``starts[b] .. starts[b] + width - 1`` of slots ``sl`` (tokens: those columns of
    ``ids``, clamped to its last): the rows before ``starts[b]`` are in the cache already. Padding rows past
    a sequence's end land in its own blocks or are dropped (table entries -1), and are overwritten later."""
    k, p = ids.shape
    cols = starts.long().view(k, 1) + torch.arange(width, device=ids.device)
    tcache = s.tcache.slots(sl.start, sl.stop)
    tcache.lengths.copy_(starts)
    aux_layers = s.drafter.aux_layers if s.drafter is not None else ()
    return target(torch.gather(ids, 1, cols.clamp(max=p - 1)), cols, tcache, None, aux_layers)


def prefill(target: LlamaModel, s: BatchState, start: int, ids: torch.Tensor, prompt_lens: torch.Tensor,
            mode: Mode, starts: torch.Tensor | None = None, width: int | None = None,
            known_first: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill slots ``start .. start + k - 1`` with right-padded prompts: long ``ids [k, P]``, int32
    ``prompt_lens [k]`` (on the device). Rows below int32 ``starts [k]`` (default 0) are in the cache
    already (a cached prefix, or earlier chunks): only the next ``width`` rows (default: to the longest
    prompt's end) are computed. Sets their caches, roots, the drafter's state and the first token (returned,
    long ``[k]``, also in ``out``); ``known_first`` long ``[k]``: that token instead of a sampled one (a
    preempted sequence resuming: its last emitted token)."""
    k, p = ids.shape
    sl = slice(start, start + k)
    starts = torch.zeros_like(prompt_lens) if starts is None else starts
    width = p if width is None else width
    out = _forward_rows(target, s, sl, ids, starts, width)
    s.tcache.lengths[sl] = prompt_lens
    last = (prompt_lens - starts - 1).long().view(k, 1)  # the prompt's last row, among the computed ones
    first = _next_tokens(s, sl, target.logits(gather_rows(out.hidden, last)[:, 0]), mode)
    if known_first is not None:
        first = known_first
    s.root_token[sl] = first
    if s.history is not None:
        end = (prompt_lens.long() - 1).view(k, 1)
        s.history[sl, :p] = ids
        s.history[sl].scatter_(1, end + 1, first.view(k, 1))
    if s.drafter is not None:
        s.drafter.prefill(s, sl, ids, prompt_lens, starts, out, first)
    s.out[sl, 0] = first
    s.out[sl, -1] = 1
    return first


def prefill_chunk(target: LlamaModel, s: BatchState, slot: int, ids: torch.Tensor, start: int,
                  end: int) -> None:
    """One chunk of a long prompt's prefill: rows ``start .. end - 1`` of slot ``slot`` (``ids`` long
    ``[1, P]``, the whole prompt, ``end < P``); the slot stays inactive until :func:`prefill` computes its
    last chunk. Between chunks its lengths are 0 (the runner knows how far it got, and hides its table row
    from the rounds it sits out): those rounds neither read its prefix nor write into it."""
    sl = slice(slot, slot + 1)
    starts = torch.full((1,), start, dtype=torch.int32, device=ids.device)
    out = _forward_rows(target, s, sl, ids, starts, end - start)
    if s.drafter is not None:
        s.drafter.prefill_chunk(s, sl, ids[:, start + 1 : end + 1], starts, out)
    for cache in s.caches():
        cache.lengths[sl] = 0


def vanilla_step(target: LlamaModel, s: BatchState, n: int, mode: Mode) -> None:
    """One token for each active slot of the first ``n``: the root goes through the target and its KV is
    committed; the next token becomes the root. Writes ``out[:n]``."""
    sl = slice(0, n)
    cache = s.tcache.slots(0, n)
    out = target(s.root_token[sl].view(n, 1), cache.lengths.view(n, 1).long(), cache)
    active = s.active[sl]
    cache.lengths += active.to(torch.int32)
    token = _next_tokens(s, sl, target.logits(out.hidden[:, 0]), mode)
    s.root_token[sl] = token
    s.out[sl, 0] = token
    s.out[sl, -1] = active.long()


def verify(s: BatchState, n: int, tree, tree_logits: torch.Tensor, mode: Mode):
    """Verify the first ``n`` slots' trees against the target's fp32 ``[n, T, V]`` logits at their nodes:
    greedy, or exact tree rejection sampling under each slot's settings (the logits become the
    probabilities in place: nothing else their size is allocated). Returns ``(num_accepted int32 [n],
    accepted_nodes int32 [n, T], bonus int64 [n])``."""
    if mode.greedy:
        return ops.tree_verify_greedy(tree.tokens, tree.parents, tree_logits.argmax(-1))
    sl, t = slice(0, n), tree_logits.shape[1]
    per_node = lambda x: x[sl].view(n, 1).expand(n, t)  # noqa: E731 (per-slot settings for each node)
    probs = probs_per_row(tree_logits, per_node(s.temperature), per_node(s.top_p), per_node(s.top_k),
                          mode.max_top_k, mode.top_p)
    return ops.tree_verify_sampling(tree.tokens, tree.parents, probs, uniforms(s.seeds[sl], s.offsets[sl], t))


def speculative_round(target: LlamaModel, s: BatchState, n: int, mode: Mode) -> None:
    """The drafter proposes a tree, the target verifies it in one forward, the accepted path is kept and
    the caches compacted, the drafter observes the result: for the first ``n`` slots. Writes ``out[:n]``:
    the accepted tokens and the bonus token."""
    drafter = s.drafter
    sl, w = slice(0, n), s.width
    tcache = s.tcache.slots(0, n)
    proposal = drafter.propose(s, n)
    tree = proposal.tree
    t = tree.tokens.shape[1]  # candidate rows come first; extra rows after them are never accepted
    positions = tcache.lengths.view(n, 1).long() + proposal.offsets
    out = target(proposal.tokens, positions, tcache, proposal.packed_mask, drafter.aux_layers)
    logits = target.logits(out.hidden)  # [n, T, V]
    num_accepted, nodes, bonus = verify(s, n, tree, logits[:, :t], mode)
    active = s.active[sl]
    counts = ((num_accepted + 1) * active).to(torch.int32)
    path = nodes[:, :w].clamp(min=0).long()
    s.compact_src[sl] = path
    s.compact_counts[sl] = counts
    s.compact_counts[n:] = 0
    ops.kv_compact(s.tcache.data, s.tcache.lengths, s.compact_src, s.compact_counts, s.tcache.block_table)
    # The kept tokens: the accepted draft tokens after the root, then the bonus token (then padding).
    path_tokens = torch.gather(tree.tokens, 1, path)
    next_tokens = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
    next_tokens = next_tokens.scatter(1, num_accepted.long().view(n, 1), bonus.view(n, 1))
    if s.history is not None:
        # Rows past the kept ones are overwritten by later rounds (history has width spare columns).
        columns = tcache.lengths.view(n, 1).long() + 1 + torch.arange(w, device=path.device)
        s.history[sl].scatter_(1, columns, next_tokens)
    tcache.lengths += counts
    drafter.observe(s, n, Verified(out, logits, path, num_accepted, next_tokens, counts))
    s.root_token[sl] = bonus
    s.out[sl, :w] = next_tokens
    s.out[sl, w] = counts.long()
