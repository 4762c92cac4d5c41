"""EAGLE drafting (EAGLE-1/2/3 heads): a one-layer draft head extrapolates the target's features into a
static, dynamic or chain tree.

Per slot ``b`` of a running sequence the head's own cache holds as many rows as the target's: draft row ``p``
pairs the target feature of position ``p`` with the token at ``p + 1``; ``root_hidden[b]`` is the head's
output at its last row, from which the next tree grows. A round's tree rows live past the committed length
and are overwritten.
"""

from __future__ import annotations

import torch

from .drafter import Drafter, Proposal, Verified, gather_rows
from .tree import TreeConfig
from .tree_build import build_tree


class EagleDrafter(Drafter):
    """Trees drafted by an EAGLE head (:mod:`eagle_engine.models.draft`) under a :class:`TreeConfig`."""

    method = "eagle"

    def __init__(self, head, tree: TreeConfig, num_target_layers: int):
        self.head, self.tree = head, tree
        self.aux_layers = head.aux_layers(num_target_layers)
        self.dcache = None
        self.root_hidden = None

    @property
    def width(self) -> int:
        return self.tree.max_depth + 1

    @property
    def rows(self) -> int:
        return max(self.tree.num_nodes, self.width)

    def bind(self, target, max_batch: int, max_len: int) -> None:
        scratch = max(self.tree.num_nodes, self.tree.draft_rows, self.width)
        self.dcache = self.head.allocate_cache(max_batch, max_len + scratch + 1)
        w = target.lm_head_weight
        hidden = self.head.config.hidden_size
        self.root_hidden = torch.zeros(max_batch, hidden, dtype=w.dtype, device=w.device)

    def per_slot(self) -> list[torch.Tensor]:
        return [self.root_hidden, self.dcache.lengths]

    def caches(self) -> list:
        return [self.dcache]

    def fuse(self) -> None:
        self.head.fuse()

    def ensure_positions(self, num_positions: int) -> None:
        self.head.ensure_positions(num_positions)

    def prefill(self, s, sl, ids, prompt_lens, out, first) -> None:
        # Draft row i pairs feature i with token i + 1; the last real row takes the new token.
        k, p = ids.shape
        last = (prompt_lens.long() - 1).view(k, 1)
        draft_tokens = torch.cat([ids[:, 1:], ids[:, :1]], 1).scatter(1, last, first.view(k, 1))
        dcache = self.dcache.slots(sl.start, sl.stop)
        dcache.lengths.zero_()
        positions = torch.arange(p, device=ids.device).expand(k, p)
        hidden = self.head.step(draft_tokens, self.head.target_features(out), positions, dcache)
        dcache.lengths.copy_(prompt_lens)
        self.root_hidden[sl] = gather_rows(hidden, last)[:, 0]

    def propose(self, s, n: int) -> Proposal:
        dcache = self.dcache.slots(0, n)
        level_positions = dcache.lengths.long().view(n, 1) - 1

        def draft_step(tokens, features, level: int, packed_mask: torch.Tensor, rows: int) -> torch.Tensor:
            positions = (level_positions + level).expand(n, tokens.shape[1])
            return self.head.step(tokens, features, positions, dcache, packed_mask, rows)

        tree = build_tree(self.tree, s.root_token[:n], self.root_hidden[:n], draft_step, self.head.topk)
        return Proposal.of_tree(tree)

    def observe(self, s, n: int, v: Verified) -> None:
        # The head re-reads the accepted path with the target's real features (its tree rows are dropped):
        # row j pairs node path[j]'s feature with the token after it, the bonus token last. Fixed width:
        # rows past the accepted ones are causal scratch beyond the committed length.
        dcache = self.dcache.slots(0, n)
        w = v.path.shape[1]
        aux = None if v.out.aux is None else gather_rows(v.out.aux, v.path)
        features = self.head.target_features(type(v.out)(gather_rows(v.out.hidden, v.path), aux))
        positions = dcache.lengths.view(n, 1).long() + torch.arange(w, device=v.path.device)
        hidden = self.head.step(v.next_tokens, features, positions, dcache)
        dcache.lengths += v.counts
        self.root_hidden[:n] = gather_rows(hidden, v.num_accepted.long().view(n, 1))[:, 0]
