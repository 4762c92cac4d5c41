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

    @property
    def cache_rows(self) -> int:
        # Draft levels write up to draft_rows rows (depth x top_k for a dynamic tree); the path after a round.
        return max(self.tree.num_nodes, self.tree.draft_rows, self.width)

    def bind(self, target, max_batch: int, max_len: int, pool=None) -> None:
        # The target's block ids and table (BatchState's pool): a block's draft rows sit in the same block.
        self.dcache = self.head.allocate_cache(max_batch, pool.capacity, pool)
        w = target.lm_head_weight
        hidden = self.head.config.hidden_size
        self.root_hidden = torch.zeros(max_batch, hidden, dtype=w.dtype, device=w.device)

    def kv_bytes_per_row(self) -> int:
        cfg, w = self.head.config, self.head.embed_tokens.weight
        return 2 * cfg.num_key_value_heads * cfg.head_dim * w.element_size()

    def per_slot(self) -> list[torch.Tensor]:
        return [self.root_hidden, self.dcache.lengths]

    def caches(self) -> list:
        return [self.dcache]

    def fuse(self) -> None:
        self.head.fuse()

    def ensure_positions(self, num_positions: int) -> None:
        self.head.ensure_positions(num_positions)

    def prefill(self, s, sl, ids, prompt_lens, starts, out, first) -> None:
        # Draft row i pairs feature i with token i + 1; the prompt's last row takes the new token.
        k, p = ids.shape
        c = out.hidden.shape[1]
        after = starts.long().view(k, 1) + torch.arange(1, c + 1, device=ids.device)
        last = (prompt_lens - starts - 1).long().view(k, 1)
        draft_tokens = torch.gather(ids, 1, after.clamp(max=p - 1)).scatter(1, last, first.view(k, 1))
        hidden = self._draft_rows(sl, draft_tokens, starts, out)
        self.dcache.lengths[sl] = prompt_lens
        self.root_hidden[sl] = gather_rows(hidden, last)[:, 0]

    def prefill_chunk(self, s, sl, next_ids, starts, out) -> None:
        self._draft_rows(sl, next_ids, starts, out)

    def _draft_rows(self, sl, tokens, starts, out) -> torch.Tensor:
        """The head over the rows the target just computed (positions ``starts[b] + j``)."""
        k, c = tokens.shape
        dcache = self.dcache.slots(sl.start, sl.stop)
        dcache.lengths.copy_(starts)
        positions = starts.long().view(k, 1) + torch.arange(c, device=tokens.device)
        return self.head.step(tokens, self.head.target_features(out), positions, dcache)

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
