"""Medusa-1 drafting: ``K`` heads on the target's last feature propose a static tree in one call.

Per slot ``b``, ``root_hidden[b]`` is the target's normed top-layer feature at the last committed position:
the one whose logits gave the root token (the last emitted token, no target KV yet). Head ``i`` on it
predicts the token ``i + 2`` positions later, i.e. depth ``i + 1`` of the tree rooted at the root token. A
path of :class:`~.methods.MedusaConfig` ``choices`` names a rank in each head's top-k, so node ``c`` (a path)
takes rank ``c[-1]`` of head ``len(c) - 1``, whatever its parent's token: the whole tree is one top-k of all
heads plus one gather. The tree's structure is a constant, built once per choices and device.
"""

from __future__ import annotations

import torch

from ..errors import EagleError
from .drafter import Drafter, Proposal, Verified, gather_rows
from .tree_build import TreeStructure, paths_in_node_order, static_structure

_LAYOUTS: dict = {}


def medusa_layout(choices, device) -> tuple[TreeStructure, torch.Tensor, int]:
    """``(structure, pick [T - 1], k)`` of the tree of ``choices``: node ``j + 1`` takes element ``pick[j]``
    of the heads' top-``k`` ids flattened ``[K * k]``."""
    key = (tuple(choices), str(device))
    if key not in _LAYOUTS:
        paths, _, parents = paths_in_node_order(choices)
        k = max(rank for c in paths for rank in c) + 1
        pick = torch.tensor([(len(c) - 1) * k + c[-1] for c in paths], dtype=torch.long, device=device)
        _LAYOUTS[key] = (static_structure(parents, device), pick, k)
    return _LAYOUTS[key]


class MedusaDrafter(Drafter):
    """Trees drafted by :class:`~eagle_engine.models.medusa.MedusaHeads` under a
    :class:`~.methods.MedusaConfig` (its ``choices`` cut to the heads' number)."""

    method = "medusa"

    def __init__(self, heads, cfg):
        self.heads, self.cfg = heads, cfg
        self.tree = cfg.tree(heads.num_heads)
        k = max(rank for c in self.tree.choices for rank in c) + 1
        if k > heads.vocab_size:
            raise EagleError(
                f"medusa choices need each head's top-{k}, but the vocabulary has {heads.vocab_size}"
            )
        self.root_hidden = self.layout = None

    @property
    def width(self) -> int:
        return self.tree.max_depth + 1

    @property
    def rows(self) -> int:
        return self.tree.num_nodes

    def bind(self, target, max_batch: int, max_len: int, pool=None) -> None:
        w = target.lm_head_weight
        self.root_hidden = torch.zeros(max_batch, self.heads.hidden_size, dtype=w.dtype, device=w.device)
        self.layout = medusa_layout(self.tree.choices, w.device)

    def per_slot(self) -> list[torch.Tensor]:
        return [self.root_hidden]

    def fuse(self) -> None:
        self.heads.fuse()

    def prefill(self, s, sl, ids, prompt_lens, starts, out, first) -> None:
        last = (prompt_lens - starts - 1).long().view(-1, 1)
        self.root_hidden[sl] = gather_rows(out.hidden, last)[:, 0]

    def propose(self, s, n: int) -> Proposal:
        structure, pick, k = self.layout
        _, ids = self.heads.topk(self.root_hidden[:n], k)  # [n, K, k]
        drafts = ids.reshape(n, -1).index_select(1, pick)
        tokens = torch.cat([s.root_token[:n].view(n, 1), drafts], 1)
        return Proposal.of_tree(structure.with_tokens(tokens))

    def observe(self, s, n: int, v: Verified) -> None:
        # The last accepted node's feature gave the bonus token, the new root.
        last = torch.gather(v.path, 1, v.num_accepted.long().view(n, 1))
        self.root_hidden[:n] = gather_rows(v.out.hidden, last)[:, 0]
