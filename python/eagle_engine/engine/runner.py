"""The EAGLE loop: prefill -> [draft tree -> verify -> accept -> compact -> draft extend]*.

Invariants between rounds, per sequence ``b``:
- the target cache holds ``lengths[b]`` committed rows; the root token (last emitted) has no target KV yet;
- the draft cache holds the same number of rows: draft row ``p`` pairs the target feature of position ``p``
  with the token at ``p + 1``, so its last row (feature of the last committed position, root token) gives
  ``root_hidden``, the draft's prediction from which the next tree grows;
- a round's tree rows (target and draft) live past ``lengths[b]`` and are compacted or overwritten.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

import eagle_kernels as ops

from ..models.llama import ForwardOutput, LlamaModel
from ..spec.sampling import SamplingParams
from ..spec.tree import TreeConfig, build_tree
from ..spec.verify import verify_tree
from .prefill import prefill
from .sequence import SequenceState, Timer


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]``: ``[B, T, F]`` and long ``[B, N]`` -> ``[B, N, F]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _select_out(out: ForwardOutput, index: torch.Tensor) -> ForwardOutput:
    aux = None if out.aux is None else _gather_rows(out.aux, index)
    return ForwardOutput(_gather_rows(out.hidden, index), aux)


class EagleRun:
    """One generate call's caches and state; :meth:`rounds` yields each round's kept tokens per sequence."""

    def __init__(
        self,
        target: LlamaModel,
        head,
        tree: TreeConfig,
        states: list[SequenceState],
        sampling: SamplingParams,
        generators: list[torch.Generator],
    ):
        self.target, self.head, self.tree = target, head, tree
        self.states, self.sampling, self.generators = states, sampling, generators
        self.device = target.model.embed_tokens.weight.device
        self.aux_layers = head.aux_layers(target.config.num_hidden_layers)
        # A finished sequence may have overshot its limit by one path; its rows stay put from then on.
        committed = max(len(s.prompt) + s.limit for s in states) + tree.max_depth + 1
        self.tcache = target.allocate_cache(len(states), committed + tree.num_nodes)
        self.dcache = head.allocate_cache(len(states), committed + max(tree.num_nodes, tree.draft_rows))

    def prefill(self, ids: torch.Tensor, prompt_lens: torch.Tensor) -> list[list[int]]:
        """Target prefill, first token, draft over the prompt. ``ids`` long ``[B, P]``, right-padded."""
        b = ids.shape[0]
        out, first = prefill(
            self.target, self.tcache, ids, prompt_lens, self.sampling, self.generators, self.aux_layers
        )
        # Draft row i pairs feature i with token i + 1; the last real row takes the new token.
        last = (prompt_lens.long() - 1).view(b, 1)
        draft_tokens = torch.cat([ids[:, 1:], ids[:, :1]], 1).scatter(1, last, first.view(b, 1))
        self._draft_extend(draft_tokens, self.head.target_features(out), last.view(b))
        self.dcache.lengths.copy_(prompt_lens)
        self.root_token = first
        return [s.append([tok]) for s, tok in zip(self.states, first.tolist())]

    def _draft_extend(self, tokens: torch.Tensor, features: torch.Tensor, last: torch.Tensor) -> None:
        """Append committed rows to the draft cache (causal) and keep the output of row ``last[b]``."""
        b, t = tokens.shape
        positions = self.dcache.lengths.view(b, 1).long() + torch.arange(t, device=self.device)
        hidden = self.head.step(tokens, features, positions, self.dcache)
        self.root_hidden = _gather_rows(hidden, last.view(b, 1))[:, 0]

    def _draft_step(self, tokens, features, level: int, row_mask: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        positions = (self.dcache.lengths.long() + (level - 1)).view(b, 1).expand(b, n)
        return self.head.step(
            tokens, features, positions, self.dcache, ops.pack_tree_mask(row_mask), row_mask.shape[-1]
        )

    def round(self) -> list[list[int]]:
        """Draft, verify, accept and compact once; return each sequence's newly kept tokens."""
        b = len(self.states)
        tree = build_tree(self.tree, self.root_token, self.root_hidden, self._draft_step, self.head.topk)
        positions = self.tcache.lengths.view(b, 1).long() + tree.depths
        out = self.target(tree.tokens, positions, self.tcache, tree.packed_mask, self.aux_layers)
        num_accepted, nodes, bonus = verify_tree(
            tree, self.target.logits(out.hidden), self.sampling, self.generators
        )
        active = torch.tensor([not s.done for s in self.states], device=self.device)
        counts = ((num_accepted + 1) * active).to(torch.int32)
        path = nodes.clamp(min=0).long()
        ops.kv_compact(self.tcache.data, self.tcache.lengths, path, counts)
        self.tcache.lengths += counts
        # The draft re-reads the accepted path with the target's real features (its tree rows are dropped):
        # row j pairs node path[j]'s feature with the token of path[j + 1], the bonus token last.
        path_tokens = torch.gather(tree.tokens, 1, path)
        next_tokens = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
        next_tokens = next_tokens.scatter(1, num_accepted.long().view(b, 1), bonus.view(b, 1))
        width = int(num_accepted.max()) + 1
        self._draft_extend(
            next_tokens[:, :width],
            self.head.target_features(_select_out(out, path[:, :width])),
            num_accepted.long(),
        )
        self.dcache.lengths += counts
        self.root_token = bonus
        kept = []
        for s, n, toks in zip(self.states, num_accepted.tolist(), next_tokens.tolist()):
            if not s.done:
                s.accept_lengths.append(n + 1)
            kept.append(s.append(toks[: n + 1]))
        return kept


def eagle_stream(
    target, head, tree, states, sampling, generators, prefill_inputs, timer: Timer, timings: dict
) -> Iterator[list[list[int]]]:
    """Yield each sequence's kept tokens after the prefill and after every round, until all are done.

    ``timings`` receives ``prefill_seconds`` and ``decode_seconds`` as they become known.
    """
    run = EagleRun(target, head, tree, states, sampling, generators)
    t0 = timer.now()
    kept = run.prefill(*prefill_inputs)
    timings["prefill_seconds"] = timer.now() - t0
    yield kept
    t1 = timer.now()
    while not all(s.done for s in states):
        kept = run.round()
        timings["decode_seconds"] = timer.now() - t1
        yield kept
