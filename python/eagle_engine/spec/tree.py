"""Draft trees: EAGLE-2 dynamic trees, EAGLE-1 static trees from a choices list, and chains.

A tree is built per sequence (batched) from the draft head's output at the root. Node 0 is the root: the last
token already emitted, whose target KV is not yet computed. Nodes are ordered so that parents precede
children. The builders only see two callbacks, so they are independent of the head and of the caches:

- ``step(tokens [B, n], features [B, n, H], level, row_mask [B, n, R]) -> hidden [B, n, H]`` runs the draft
  on ``n`` new nodes of one level; they become draft rows ``R - n .. R - 1`` of this round, and
  ``row_mask`` says which earlier draft rows (ancestors) each one sees;
- ``topk(hidden [B, n, H], k) -> (logprobs [B, n, k], token_ids [B, n, k])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import eagle_kernels as ops

from ..errors import InvalidRequestError

# EAGLE-1's default static tree (SafeAILab/EAGLE v1 model/choices.py): 25 nodes + root, depth 5.
MC_SIM_7B_63 = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip

MAX_TREE_DEPTH = 128


@dataclass(frozen=True)
class TreeConfig:
    """How a round drafts.

    ``kind="dynamic"`` (EAGLE-2): ``total_tokens`` nodes including the root, chosen by cumulative draft
    log-probability among the candidates of ``depth`` expansion steps of a ``top_k`` beam; as in the official
    code, paths hold up to ``depth + 1`` draft tokens. ``kind="static"`` (EAGLE-1): the fixed tree of
    ``choices`` (paths of child ranks, default ``mc_sim_7b_63``). ``kind="chain"``: one path of ``depth + 1``
    tokens (a dynamic tree with ``top_k = 1``).
    """

    kind: str = "dynamic"
    total_tokens: int = 60
    depth: int = 6
    top_k: int = 10
    choices: tuple[tuple[int, ...], ...] = field(default=MC_SIM_7B_63)

    def __post_init__(self):
        if self.kind not in ("dynamic", "static", "chain"):
            raise InvalidRequestError(f"tree kind must be dynamic, static or chain, got {self.kind!r}")
        if self.kind == "chain":
            object.__setattr__(self, "top_k", 1)
            object.__setattr__(self, "total_tokens", self.depth + 2)
        if self.kind == "static":
            self._check_choices()
            return
        if not 0 <= self.depth < MAX_TREE_DEPTH:
            raise InvalidRequestError(f"tree depth must be in [0, {MAX_TREE_DEPTH}), got {self.depth}")
        if self.top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1, got {self.top_k}")
        most = 1 + self.top_k + self.depth * self.top_k**2
        if not 2 <= self.total_tokens <= most:
            raise InvalidRequestError(
                f"total_tokens must be in [2, {most}] for depth {self.depth} and top_k "
                f"{self.top_k}, got {self.total_tokens}"
            )

    def _check_choices(self):
        paths = {tuple(c) for c in self.choices}
        if not paths or len(paths) != len(self.choices):
            raise InvalidRequestError("static tree choices must be a non-empty list of distinct paths")
        for path in paths:
            if not path or min(path) < 0 or len(path) >= MAX_TREE_DEPTH:
                raise InvalidRequestError(f"bad static tree path {list(path)}")
            if len(path) > 1 and path[:-1] not in paths:
                raise InvalidRequestError(f"static tree path {list(path)} lacks its parent {list(path[:-1])}")

    @property
    def num_nodes(self) -> int:
        """Tree size including the root (the number of rows the target verifies)."""
        return len(self.choices) + 1 if self.kind == "static" else self.total_tokens

    @property
    def max_depth(self) -> int:
        """Longest root-to-leaf path in draft tokens."""
        return max(len(c) for c in self.choices) if self.kind == "static" else self.depth + 1

    @property
    def draft_rows(self) -> int:
        """Draft-cache rows one round's expansion writes."""
        if self.kind == "static":
            return sum(
                1 for c in self.choices if any(len(d) == len(c) + 1 and d[:-1] == c for d in self.choices)
            )
        return self.depth * self.top_k


@dataclass
class DraftTree:
    """``tokens`` long ``[B, T]``; ``parents`` int32 ``[B, T]`` (-1 at the root); ``depths`` long ``[B, T]``;
    ``mask`` bool ``[B, T, T]``: node ``i`` sees node ``j`` iff ``j`` is ``i`` or one of its ancestors;
    ``packed_mask``: the same as int32 bits for :func:`eagle_kernels.tree_attention`."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor
    packed_mask: torch.Tensor

    @classmethod
    def from_parents(cls, tokens: torch.Tensor, parents: torch.Tensor, max_depth: int | None = None):
        """Derive depths and the ancestor mask from parent indices (parents precede children), on the device
        with a fixed number of launches: pointer doubling, ``ceil(log2(max_depth + 1))`` steps."""
        mask, depths = ancestor_mask(parents, tokens.shape[1] - 1 if max_depth is None else max_depth)
        return cls(tokens, parents.to(torch.int32), depths, mask, ops.pack_tree_mask(mask))

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
    the root), for trees no deeper than ``max_depth``.

    Step ``s`` joins each node's set with the set of its ``2^(s+1)``-th ancestor, so after ``s`` steps a set
    holds every ancestor up to distance ``2^(s+1) - 1``; the root is its own parent, so overshooting is safe.
    """
    b, t = parents.shape
    up = parents.long().clamp(min=0)  # the root points to itself
    mask = torch.eye(t, dtype=torch.bool, device=parents.device).expand(b, t, t).clone()
    mask.scatter_(2, up.unsqueeze(-1), True)
    mask[:, 0, 0] = True
    jump = torch.gather(up, 1, up)  # 2 levels up
    reach = 1
    while reach < max_depth:
        mask |= torch.gather(mask, 1, jump.unsqueeze(-1).expand(b, t, t))
        jump = torch.gather(jump, 1, jump)
        reach = 2 * reach + 1
    depths = mask.sum(-1) - 1
    return mask, depths


def build_tree(cfg: TreeConfig, root_token: torch.Tensor, root_hidden: torch.Tensor, step, topk) -> DraftTree:
    """Draft one tree per sequence. ``root_token`` long ``[B]``; ``root_hidden`` ``[B, H]``.

    A fixed number of launches per level and no host synchronisation: the same code serves the CPU and a
    captured CUDA graph."""
    if cfg.kind == "static":
        return _build_static(cfg, root_token, root_hidden, step, topk)
    return _build_dynamic(cfg, root_token, root_hidden, step, topk)


def _build_dynamic(cfg: TreeConfig, root_token, root_hidden, step, topk) -> DraftTree:
    b, k = root_hidden.shape[0], cfg.top_k
    dev = root_hidden.device
    logprobs, ids = topk(root_hidden.unsqueeze(1), k)
    scores = logprobs[:, 0]  # [B, k] cumulative scores of the beam
    cand_tokens, cand_scores = [ids[:, 0]], [scores]
    cand_parents = [torch.full((b, k), -1, dtype=torch.long, device=dev)]  # candidate index, -1 = root
    beam = torch.arange(k, device=dev).expand(b, k)  # candidate indices of the beam
    beam_tokens, beam_features = ids[:, 0], root_hidden.unsqueeze(1).expand(b, k, -1)
    row_mask = torch.zeros(b, k, 0, dtype=torch.bool, device=dev)
    eye = torch.eye(k, dtype=torch.bool, device=dev).expand(b, k, k)
    num_cand = k
    for level in range(1, cfg.depth + 1):
        mask = torch.cat([row_mask, eye], dim=-1)
        hidden = step(beam_tokens, beam_features, level, mask)
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
        row_mask = torch.gather(mask, 1, parent_slot.unsqueeze(-1).expand(-1, -1, mask.shape[-1]))
        num_cand += k * k
    return _select(
        cfg,
        root_token,
        torch.cat(cand_tokens, 1),
        torch.cat(cand_scores, 1),
        torch.cat(cand_parents, 1),
    )


def _select(cfg: TreeConfig, root_token, tokens, scores, parents) -> DraftTree:
    """Keep the ``total_tokens - 1`` best candidates by cumulative score, in candidate order (parents first).

    A child's score never exceeds its parent's and its index is larger, so ranking by (score desc, index
    asc) keeps every kept node's parent.
    """
    n = cfg.total_tokens - 1
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
    return DraftTree.from_parents(tree_tokens, tree_parents, cfg.max_depth)


@dataclass(frozen=True)
class _StaticPlan:
    """Everything about a static tree that does not depend on the draft's output, built once per config and
    device. Per level: which earlier outputs feed the top-k, which nodes take which ranks, which nodes are
    expanded by the step and what they see."""

    parents: torch.Tensor  # long [T]
    depths: torch.Tensor  # long [T]
    mask: torch.Tensor  # bool [T, T]
    packed: torch.Tensor  # int32 [1, T, W]
    width: int  # top-k width
    # per level: (topk_src [P], nodes [N], pick [N], expand [M], step_src [M], row_mask [M, R])
    levels: tuple


_STATIC_PLANS: dict = {}


def _static_plan(cfg: TreeConfig, device: torch.device) -> _StaticPlan:
    key = (cfg.choices, str(device))
    if key in _STATIC_PLANS:
        return _STATIC_PLANS[key]
    choices = sorted(cfg.choices, key=lambda c: (len(c), c))
    index = {c: i + 1 for i, c in enumerate(choices)}  # path -> node
    parents = [-1] + [index.get(c[:-1], 0) for c in choices]
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
            tensor(step_src), row_mask.to(device),
        ))
    parent_t = tensor(parents).view(1, -1)
    mask, depths = ancestor_mask(parent_t, len(parents))
    plan = _StaticPlan(parent_t[0], depths[0], mask[0], ops.pack_tree_mask(mask), width, tuple(levels))
    _STATIC_PLANS[key] = plan
    return plan


def _build_static(cfg: TreeConfig, root_token, root_hidden, step, topk) -> DraftTree:
    plan = _static_plan(cfg, root_hidden.device)
    b, h = root_hidden.shape
    t = plan.parents.shape[0]
    outputs = root_hidden.unsqueeze(1)  # [B, 1 + rows so far, H]: the root, then each step's rows
    tokens = torch.empty(b, t, dtype=torch.long, device=root_hidden.device)
    tokens[:, 0] = root_token
    for level, (topk_src, nodes, pick, expand, step_src, row_mask) in enumerate(plan.levels, start=1):
        _, ids = topk(outputs.index_select(1, topk_src), plan.width)  # [B, P, width]
        tokens[:, nodes] = ids.reshape(b, -1).index_select(1, pick)
        if expand.numel():
            feats = outputs.index_select(1, step_src)
            out = step(tokens.index_select(1, expand), feats, level, row_mask.expand(b, -1, -1))
            outputs = torch.cat([outputs, out], 1)
    return DraftTree(
        tokens,
        plan.parents.to(torch.int32).expand(b, t),
        plan.depths.expand(b, t),
        plan.mask.expand(b, t, t),
        plan.packed.expand(b, -1, -1),
    )
