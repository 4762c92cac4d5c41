"""The device side of decoding: every slot's state in static buffers, and the steps that run over them.

Each step works on the first ``n`` slots (views of buffers sized for ``max_batch_size``), reads nothing back
to the host, and writes what the host needs into ``out`` — so that the same code runs eagerly on a CPU and is
captured once per batch bucket into a CUDA graph on a GPU.

Invariants between steps, per slot ``b`` of a running sequence:
- the target cache holds ``lengths[b]`` committed rows; ``root_token[b]`` (the last emitted token) has no
  target KV yet;
- with a draft head, the draft cache holds the same number of rows: draft row ``p`` pairs the target
  feature of position ``p`` with the token at ``p + 1``; ``root_hidden[b]`` is the draft's output at its
  last row, from which the next tree grows;
- a round's tree rows (target and draft) live past ``lengths[b]`` and are compacted or overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import eagle_kernels as ops

from ..models.llama import ForwardOutput, LlamaModel
from ..spec.sampling import probs_per_row, sample_from_probs, uniforms
from ..spec.tree import TreeConfig
from ..spec.tree_build import build_tree


@dataclass(frozen=True)
class Mode:
    """What the host knows about the running batch that changes the computation (and so the graph)."""

    greedy: bool = True  # every running sequence is greedy: argmax verification, no randoms
    max_top_k: int = 0  # largest top_k among sampled sequences (0: none)
    top_p: bool = False  # some sampled sequence has top_p < 1


class BatchState:
    """Static device buffers for ``max_batch`` slots: caches, roots, per-slot sampling settings, outputs.

    ``out`` long ``[max_batch, width + 1]``: after a step, row ``b`` holds the tokens the step produced for
    slot ``b`` in ``[:width]`` and how many of them count in ``[width]`` (0 for an inactive slot).
    """

    def __init__(self, target: LlamaModel, head, tree: TreeConfig | None, max_batch: int, max_len: int):
        dev, dtype = target.lm_head_weight.device, target.lm_head_weight.dtype
        self.max_batch, self.max_len = max_batch, max_len
        # Path width: the root and up to max_depth accepted nodes; vanilla emits one token.
        self.width = tree.max_depth + 1 if head is not None else 1
        scratch = max(tree.num_nodes, tree.draft_rows, self.width) if head is not None else 1
        self.tcache = target.allocate_cache(max_batch, max_len + scratch + 1)
        self.dcache = head.allocate_cache(max_batch, max_len + scratch + 1) if head is not None else None
        hidden = head.config.hidden_size if head is not None else 1

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        self.root_token = zeros(max_batch)
        self.root_hidden = zeros(max_batch, hidden, dtype=dtype)
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

    def per_slot(self) -> list[torch.Tensor]:
        """Every per-slot buffer (dimension 0 is the slot), for moving a sequence between slots."""
        bufs = [self.root_token, self.root_hidden, self.active, self.temperature, self.top_p, self.top_k]
        bufs += [self.seeds, self.offsets, self.tcache.lengths]
        return bufs + ([self.dcache.lengths] if self.dcache is not None else [])


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]``: ``[B, T, F]`` and long ``[B, N]`` -> ``[B, N, F]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _select_out(out: ForwardOutput, index: torch.Tensor) -> ForwardOutput:
    aux = None if out.aux is None else _gather_rows(out.aux, index)
    return ForwardOutput(_gather_rows(out.hidden, index), aux)


def _next_tokens(s: BatchState, sl: slice, logits: torch.Tensor, mode: Mode) -> torch.Tensor:
    """One token per row of fp32 ``[n, V]`` logits under each slot's sampling settings."""
    if mode.greedy:
        return logits.argmax(-1)
    probs = probs_per_row(logits, s.temperature[sl], s.top_p[sl], s.top_k[sl], mode.max_top_k, mode.top_p)
    return sample_from_probs(probs, uniforms(s.seeds[sl], s.offsets[sl], 1)[:, 0])


def prefill(
    target: LlamaModel, head, s: BatchState, start: int, ids: torch.Tensor, prompt_lens: torch.Tensor,
    mode: Mode,
) -> torch.Tensor:
    """Prefill slots ``start .. start + k - 1`` with right-padded prompts: long ``ids [k, P]``, int32
    ``prompt_lens [k]`` (on the device). Sets their caches, roots and the first token (returned, long
    ``[k]``, also in ``out``)."""
    k, p = ids.shape
    sl = slice(start, start + k)
    tcache = s.tcache.slots(start, start + k)
    tcache.lengths.zero_()
    aux_layers = head.aux_layers(target.config.num_hidden_layers) if head is not None else ()
    # Padding rows land past each prompt and are overwritten later.
    out = target(ids, torch.arange(p, device=ids.device).expand(k, p), tcache, None, aux_layers)
    tcache.lengths.copy_(prompt_lens)
    last = (prompt_lens.long() - 1).view(k, 1)
    first = _next_tokens(s, sl, target.logits(_gather_rows(out.hidden, last)[:, 0]), mode)
    if head is not None:
        # Draft row i pairs feature i with token i + 1; the last real row takes the new token.
        draft_tokens = torch.cat([ids[:, 1:], ids[:, :1]], 1).scatter(1, last, first.view(k, 1))
        dcache = s.dcache.slots(start, start + k)
        dcache.lengths.zero_()
        hidden = head.step(draft_tokens, head.target_features(out), torch.arange(p, device=ids.device)
                           .expand(k, p), dcache)
        dcache.lengths.copy_(prompt_lens)
        s.root_hidden[sl] = _gather_rows(hidden, last)[:, 0]
    s.root_token[sl] = first
    s.out[sl, 0] = first
    s.out[sl, -1] = 1
    return first


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


def eagle_round(target: LlamaModel, head, tree: TreeConfig, s: BatchState, n: int, mode: Mode) -> None:
    """Draft a tree, verify it in one target forward, accept, compact the caches, extend the draft over the
    accepted path: for the first ``n`` slots. Writes ``out[:n]``: the accepted tokens and the bonus token."""
    sl, w = slice(0, n), s.width
    tcache, dcache = s.tcache.slots(0, n), s.dcache.slots(0, n)
    aux_layers = head.aux_layers(target.config.num_hidden_layers)

    level_positions = dcache.lengths.long().view(n, 1) - 1

    def draft_step(tokens, features, level: int, packed_mask: torch.Tensor, rows: int) -> torch.Tensor:
        positions = (level_positions + level).expand(n, tokens.shape[1])
        return head.step(tokens, features, positions, dcache, packed_mask, rows)

    draft = build_tree(tree, s.root_token[sl], s.root_hidden[sl], draft_step, head.topk)
    t = draft.tokens.shape[1]
    positions = tcache.lengths.view(n, 1).long() + draft.depths
    out = target(draft.tokens, positions, tcache, draft.packed_mask, aux_layers)
    logits = target.logits(out.hidden)  # [n, T, V]
    if mode.greedy:
        num_accepted, nodes, bonus = ops.tree_verify_greedy(draft.tokens, draft.parents, logits.argmax(-1))
    else:
        rows = lambda x: x.repeat_interleave(t)  # noqa: E731 (per-slot settings for each tree node)
        probs = probs_per_row(logits.view(n * t, -1), rows(s.temperature[sl]), rows(s.top_p[sl]),
                              rows(s.top_k[sl]), mode.max_top_k, mode.top_p).view(n, t, -1)
        u = uniforms(s.seeds[sl], s.offsets[sl], t)
        num_accepted, nodes, bonus = ops.tree_verify_sampling(draft.tokens, draft.parents, probs, u)
    active = s.active[sl]
    counts = ((num_accepted + 1) * active).to(torch.int32)
    path = nodes[:, :w].clamp(min=0).long()
    s.compact_src[sl] = path
    s.compact_counts[sl] = counts
    s.compact_counts[n:] = 0
    ops.kv_compact(s.tcache.data, s.tcache.lengths, s.compact_src, s.compact_counts)
    tcache.lengths += counts
    # The draft re-reads the accepted path with the target's real features (its tree rows are dropped):
    # row j pairs node path[j]'s feature with the token of path[j + 1], the bonus token last. Fixed width:
    # rows past the accepted ones are causal scratch beyond the committed length.
    path_tokens = torch.gather(draft.tokens, 1, path)
    next_tokens = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
    next_tokens = next_tokens.scatter(1, num_accepted.long().view(n, 1), bonus.view(n, 1))
    positions = dcache.lengths.view(n, 1).long() + torch.arange(w, device=positions.device)
    hidden = head.step(next_tokens, head.target_features(_select_out(out, path)), positions, dcache)
    dcache.lengths += counts
    s.root_hidden[sl] = _gather_rows(hidden, num_accepted.long().view(n, 1))[:, 0]
    s.root_token[sl] = bonus
    s.out[sl, :w] = next_tokens
    s.out[sl, w] = counts.long()
