"""Drafting trees on the device: EAGLE-2 dynamic trees, EAGLE-1 static trees, chains.

A tree is built per sequence (batched) from the draft head's output at the root. Node 0 is the root: the last
token already emitted, whose target KV is not yet computed. Nodes are ordered so that parents precede
children. Every builder issues a fixed number of launches per level, loops over no node and reads nothing
back to the host, so the same code runs on a CPU and inside a CUDA graph. Masks are kept as packed int32 bits
(the layout of :func:`eagle_kernels.pack_tree_mask`) from the start.

The builders only see two callbacks, so they are independent of the head and of the caches:

- ``step(tokens [B, n], features [B, n, H], level, packed_mask [B, n, ceil(R / 32)], R) -> hidden [B, n, H]``
  runs the draft on ``n`` new nodes of one level; they become draft rows ``R - n .. R - 1`` of this round,
  and the mask says which of the ``R`` draft rows (ancestors and itself) each one sees;
- ``topk(hidden [B, n, H], k) -> (logprobs [B, n, k], token_ids [B, n, k])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import eagle_kernels as ops

from .tree import TreeConfig


@dataclass
class DraftTree:
    """``tokens`` long ``[B, T]``; ``parents`` int32 ``[B, T]`` (-1 at the root); ``depths`` long ``[B, T]``;
    ``packed_mask`` int32 ``[B, T, ceil(T / 32)]`` for :func:`eagle_kernels.tree_attention`: node ``i`` sees
    node ``j`` iff ``j`` is ``i`` or one of its ancestors."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    packed_mask: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """The ancestor mask as bool ``[B, T, T]``."""
        return ops.unpack_tree_mask(self.packed_mask, self.tokens.shape[1])

    @classmethod
    def from_parents(cls, tokens: torch.Tensor, parents: torch.Tensor) -> "DraftTree":
        """Derive depths and the ancestor mask from parent indices (parents precede children)."""
        mask, depths = ancestor_mask(parents, tokens.shape[1] - 1)
        return cls(tokens, parents.to(torch.int32), depths, ops.pack_tree_mask(mask))

    def paths(self, b: int = 0) -> list[list[int]]:
        """Root-to-leaf node paths of sequence ``b``, by leaf index (the official ``retrieve_indices``)."""
        parents = self.parents[b].tolist()
        has_child = {p for p in parents[1:]}
        leaves = [i for i in range(len(parents)) if i not in has_child]
        out = []
        for leaf in leaves:
            path = [leaf]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            out.append(path[::-1])
        return out


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor-or-self mask bool ``[B, T, T]`` and depths long ``[B, T]`` from int ``[B, T]`` parents (-1 at
    the root), by pointer doubling (see :func:`ancestor_bits`)."""
    t = parents.shape[1]
    mask = ops.unpack_tree_mask(ancestor_bits(parents, max_depth), t)
    return mask, mask.sum(-1) - 1


_EYE_BITS: dict = {}


def eye_bits(t: int, device: torch.device) -> torch.Tensor:
    """int32 ``[t, ceil(t / 32)]``: row ``i`` has bit ``i`` only (a constant, built once per size)."""
    key = (t, str(device))
    if key not in _EYE_BITS:
        _EYE_BITS[key] = ops.pack_tree_mask(torch.eye(t, dtype=torch.bool, device=device))[0]
    return _EYE_BITS[key]


def ancestor_bits(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Packed ancestor-or-self mask int32 ``[B, T, ceil(T / 32)]`` of trees no deeper than ``max_depth``.

    Start from each node's own bit and its parent's; step ``s`` ORs in the set of the ``2^(s+1)``-th
    ancestor, so after ``s`` steps a set holds every ancestor up to distance ``2^(s+1) - 1``. The root is its
    own parent, so overshooting is harmless: ``ceil(log2(max_depth + 1)) - 1`` steps of 3 launches.
    """
    b, t = parents.shape
    up = parents.long().clamp(min=0)
    eye = eye_bits(t, parents.device)
    bits = eye.expand(b, t, -1) | eye.index_select(0, up.reshape(-1)).view(b, t, -1)
    jump = torch.gather(up, 1, up)
    reach = 1
    while reach < max_depth:
        bits = bits | torch.gather(bits, 1, jump.unsqueeze(-1).expand_as(bits))
        jump = torch.gather(jump, 1, jump)
        reach = 2 * reach + 1
    return bits


def build_tree(cfg: TreeConfig, root_token: torch.Tensor, root_hidden: torch.Tensor, step, topk) -> DraftTree:
    """Draft one tree per sequence. ``root_token`` long ``[B]``; ``root_hidden`` ``[B, H]``."""
    if cfg.kind == "static":
        return _build_static(cfg, root_token, root_hidden, step, topk)
    return _build_dynamic(cfg, root_token, root_hidden, step, topk)


def _level_bits(cfg: TreeConfig, device: torch.device) -> torch.Tensor:
    """int32 ``[depth, top_k, ceil(depth * top_k / 32)]``: the own bit of beam slot ``i`` at each level."""
    k, rows = cfg.top_k, max(cfg.depth, 1) * cfg.top_k
    return eye_bits(rows, device).view(max(cfg.depth, 1), k, -1)


def _build_dynamic(cfg: TreeConfig, root_token, root_hidden, step, topk) -> DraftTree:
    b, k = root_hidden.shape[0], cfg.top_k
    dev = root_hidden.device
    logprobs, ids = topk(root_hidden.unsqueeze(1), k)
    scores = logprobs[:, 0]  # [B, k] cumulative scores of the beam
    cand_tokens, cand_scores = [ids[:, 0]], [scores]
    cand_parents = [torch.full((b, k), -1, dtype=torch.long, device=dev)]  # candidate index, -1 = root
    beam = torch.arange(k, device=dev).expand(b, k)  # candidate indices of the beam
    beam_tokens, beam_features = ids[:, 0], root_hidden.unsqueeze(1).expand(b, k, -1)
    own_bits = _level_bits(cfg, dev)
    beam_bits = own_bits[0].expand(b, k, -1)  # draft rows each beam node sees: its ancestors and itself
    num_cand = k
    for level in range(1, cfg.depth + 1):
        rows = level * k
        hidden = step(beam_tokens, beam_features, level, beam_bits[..., : (rows + 31) // 32], rows)
        logprobs, ids = topk(hidden, k)  # [B, k, k]
        child_scores = (scores.unsqueeze(-1) + logprobs).reshape(b, k * k)
        cand_tokens.append(ids.reshape(b, k * k))
        cand_scores.append(child_scores)
        cand_parents.append(beam.unsqueeze(-1).expand(b, k, k).reshape(b, k * k))
        scores, chosen = torch.topk(child_scores, k, dim=-1)
        parent_slot = chosen // k
        beam = num_cand + chosen
        beam_tokens = torch.gather(ids.reshape(b, k * k), 1, chosen)
        beam_features = torch.gather(hidden, 1, parent_slot.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if level < cfg.depth:
            parent_bits = torch.gather(beam_bits, 1, parent_slot.unsqueeze(-1).expand_as(beam_bits))
            beam_bits = parent_bits | own_bits[level]
        num_cand += k * k
    return _select(cfg, root_token, torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1),
                   torch.cat(cand_parents, 1))


def _select(cfg: TreeConfig, root_token, tokens, scores, parents) -> DraftTree:
    """Keep the ``total_tokens - 1`` best candidates by cumulative score, in candidate order (parents first).

    A child's score never exceeds its parent's and its index is larger, so ranking by (score desc, index
    asc) keeps every kept node's parent. A candidate's depth follows from its index: the first ``top_k``
    are depth 1, then each level adds a block of ``top_k ** 2``.
    """
    n, k = cfg.total_tokens - 1, cfg.top_k
    b, num = scores.shape
    dev = scores.device
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :n]
    kept = torch.sort(order, dim=1).values  # [B, n] candidate indices
    node_of = torch.zeros(b, num, dtype=torch.long, device=dev)
    node_of.scatter_(1, kept, torch.arange(1, n + 1, device=dev).expand(b, n))
    parent_cand = torch.gather(parents, 1, kept)
    parent_node = torch.where(parent_cand < 0, 0, torch.gather(node_of, 1, parent_cand.clamp(min=0)))
    tree_tokens = torch.cat([root_token.view(b, 1), torch.gather(tokens, 1, kept)], 1)
    tree_parents = torch.cat([torch.full((b, 1), -1, device=dev, dtype=torch.long), parent_node], 1)
    depth = torch.where(kept < k, 1, 2 + (kept - k).div(k * k, rounding_mode="floor"))
    depths = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), depth], 1)
    packed = ancestor_bits(tree_parents, cfg.max_depth)
    return DraftTree(tree_tokens, tree_parents.to(torch.int32), depths, packed)


@dataclass(frozen=True)
class TreeStructure:
    """A tree's shape without its tokens, a constant built once (static trees, Medusa trees, chains):
    ``parents`` int32 ``[T]`` (-1 at the root), ``depths`` long ``[T]``, ``packed`` int32 ``[1, T, W]``."""

    parents: torch.Tensor
    depths: torch.Tensor
    packed: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[0]

    def with_tokens(self, tokens: torch.Tensor) -> DraftTree:
        """The :class:`DraftTree` of long ``tokens [B, T]`` on this shape (views, nothing copied)."""
        b, t = tokens.shape
        packed = self.packed.expand(b, -1, -1)
        return DraftTree(tokens, self.parents.expand(b, t), self.depths.expand(b, t), packed)


@dataclass(frozen=True)
class _StaticPlan:
    """Everything about a static tree that does not depend on the draft's output, built once per config and
    device. Per level: which earlier outputs feed the top-k, which nodes take which ranks, which nodes are
    expanded by the step and what they see."""

    structure: TreeStructure
    width: int  # top-k width
    # per level: (topk_src [P], nodes [N], pick [N], expand [M], step_src [M], packed row mask [M, W_R], R)
    levels: tuple


def paths_in_node_order(choices) -> tuple[list[tuple[int, ...]], dict, list[int]]:
    """A static tree's paths in node order (by length, then ranks: parents precede children), the node of
    each path (the root is node 0) and each node's parent (-1 at the root)."""
    choices = sorted(choices, key=lambda c: (len(c), c))
    index = {c: i + 1 for i, c in enumerate(choices)}
    return choices, index, [-1] + [index.get(c[:-1], 0) for c in choices]


def static_structure(parents: list[int], device) -> TreeStructure:
    """The :class:`TreeStructure` of a tree given by its parent list (-1 at the root)."""
    parent_t = torch.tensor(parents, dtype=torch.long, device=device).view(1, -1)
    mask, depths = ancestor_mask(parent_t, len(parents))
    return TreeStructure(parent_t[0].to(torch.int32), depths[0], ops.pack_tree_mask(mask))


_STATIC_PLANS: dict = {}


def _static_plan(cfg: TreeConfig, device: torch.device) -> _StaticPlan:
    key = (cfg.choices, str(device))
    if key in _STATIC_PLANS:
        return _STATIC_PLANS[key]
    choices, index, parents = paths_in_node_order(cfg.choices)
    width = max(c[-1] for c in choices) + 1
    source_of = {0: 0}  # node -> index into the stacked outputs (0: the root's hidden)
    rows: list[int] = []  # draft rows of this round, by node
    levels = []

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    for level in range(1, max(len(c) for c in choices) + 1):
        nodes = [index[c] for c in choices if len(c) == level]
        expanded = sorted({parents[n] for n in nodes})
        pick = [expanded.index(parents[n]) * width + choices[n - 1][-1] for n in nodes]
        expand = sorted({index[c[:-1]] for c in choices if len(c) == level + 1})
        first_row = len(rows)
        rows.extend(expand)
        row_mask = torch.zeros(len(expand), len(rows), dtype=torch.bool)
        for i, n in enumerate(expand):
            a = n
            while a > 0:
                row_mask[i, rows.index(a)] = True
                a = parents[a]
        step_src = [source_of[parents[n]] for n in expand]
        for i, n in enumerate(expand):
            source_of[n] = 1 + first_row + i
        levels.append((
            tensor([source_of[p] for p in expanded]), tensor(nodes), tensor(pick), tensor(expand),
            tensor(step_src), ops.pack_tree_mask(row_mask.to(device)), len(rows),
        ))
    plan = _StaticPlan(static_structure(parents, device), width, tuple(levels))
    _STATIC_PLANS[key] = plan
    return plan


def _build_static(cfg: TreeConfig, root_token, root_hidden, step, topk) -> DraftTree:
    plan = _static_plan(cfg, root_hidden.device)
    b = root_hidden.shape[0]
    t = plan.structure.num_nodes
    outputs = root_hidden.unsqueeze(1)  # [B, 1 + rows so far, H]: the root, then each step's rows
    tokens = torch.empty(b, t, dtype=torch.long, device=root_hidden.device)
    tokens[:, 0] = root_token
    for level, (topk_src, nodes, pick, expand, step_src, row_bits, rows) in enumerate(plan.levels, start=1):
        _, ids = topk(outputs.index_select(1, topk_src), plan.width)  # [B, P, width]
        tokens[:, nodes] = ids.reshape(b, -1).index_select(1, pick)
        if expand.numel():
            feats = outputs.index_select(1, step_src)
            out = step(tokens.index_select(1, expand), feats, level, row_bits.expand(b, -1, -1), rows)
            outputs = torch.cat([outputs, out], 1)
    return plan.structure.with_tokens(tokens)
