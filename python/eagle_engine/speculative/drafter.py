"""The drafter protocol: what a speculative method supplies to the engine's round.

Every method (EAGLE, Medusa, Lookahead, prompt lookup) runs the same round (:func:`eagle_engine.engine.batch
.speculative_round`): the drafter *proposes* a tree of candidate tokens rooted at each slot's last emitted
token, the target verifies the tree in one forward (greedy or sampling, exactly lossless whatever the
candidates), the accepted path's KV rows are compacted, and the drafter *observes* the verified forward to
update its own state. A drafter may append rows that are not candidates (Lookahead's Jacobi window): they
ride in the same target forward with their own positions and mask and are never accepted.

A drafter owns per-slot device buffers (sized ``max_batch`` when :meth:`Drafter.bind` is called) and never
reads anything back to the host, so a round stays one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree_build import DraftTree


@dataclass
class Proposal:
    """One round's target input for ``n`` slots.

    ``tree``: the candidates (``T_v`` nodes, node 0 the root). ``tokens`` long ``[n, T]``, ``offsets`` long
    ``[n, T]`` (position minus the slot's committed length) and ``packed_mask`` int32 ``[n, T, ceil(T/32)]``
    cover the whole forward: the tree's rows first, then any extra rows (``T >= T_v``).
    """

    tree: DraftTree
    tokens: torch.Tensor
    offsets: torch.Tensor
    packed_mask: torch.Tensor

    @classmethod
    def of_tree(cls, tree: DraftTree) -> "Proposal":
        return cls(tree, tree.tokens, tree.depths, tree.packed_mask)


@dataclass
class Verified:
    """What a round's verification decided, for :meth:`Drafter.observe` (``n`` slots, path width ``w``).

    ``out``: the target's :class:`ForwardOutput` over all ``T`` rows; ``logits`` fp32 ``[n, T, V]`` (when
    sampling, the candidate rows hold the target's probabilities instead: they are computed in place; extra
    rows keep their logits);
    ``path`` long ``[n, w]`` (accepted tree nodes from the root, padded with 0); ``num_accepted`` int
    ``[n]``; ``next_tokens`` long ``[n, w]`` (the accepted draft tokens then the bonus token, then padding);
    ``counts`` int32 ``[n]`` (rows committed: accepted + 1, 0 for an inactive slot)."""

    out: object
    logits: torch.Tensor
    path: torch.Tensor
    num_accepted: torch.Tensor
    next_tokens: torch.Tensor
    counts: torch.Tensor


class Drafter:
    """Base class of the speculative methods (see the module docstring). Subclasses set ``method`` and
    override :meth:`propose`, and whichever hooks they need."""

    method = ""
    aux_layers: tuple[int, ...] = ()  # target layers whose input residuals the drafter reads (EAGLE-3)
    needs_history: bool = False  # the round keeps each slot's token history in ``s.history``

    @property
    def width(self) -> int:
        """Longest accepted path plus the bonus token: the tokens one round can emit."""
        raise NotImplementedError

    @property
    def rows(self) -> int:
        """Target rows one round writes past the committed length (tree plus extra rows)."""
        raise NotImplementedError

    @property
    def cache_rows(self) -> int:
        """Rows one round writes past the committed length of the drafter's own KV cache (0: none)."""
        return 0

    def bind(self, target, max_batch: int, max_len: int, pool=None) -> None:
        """Allocate per-slot state for ``max_batch`` slots of sequences up to ``max_len`` tokens; a drafter
        with a KV cache pages it as ``pool`` (:class:`~eagle_engine.kv_cache.PoolShape`: the target cache's
        block table and block ids) says."""

    def kv_bytes_per_row(self) -> int:
        """Bytes one cache row of the drafter's own KV cache takes (0: it has none)."""
        return 0

    def per_slot(self) -> list[torch.Tensor]:
        """Per-slot buffers (dimension 0 is the slot), moved whole when a sequence changes slot."""
        return []

    def caches(self) -> list:
        """Per-slot KV caches whose committed rows move with a sequence."""
        return []

    def prefill(self, s, sl: slice, ids: torch.Tensor, prompt_lens: torch.Tensor, starts: torch.Tensor, out,
                first) -> None:
        """Initialise slots ``sl`` after the target's prefill: ``ids`` long ``[k, P]`` right-padded prompts,
        ``prompt_lens`` int32 ``[k]``, ``out`` the target's :class:`ForwardOutput` over the rows it computed:
        row ``j`` of sequence ``b`` is position ``starts[b] + j`` (int32 ``starts [k]``: the rows before were
        in the cache already), ``first`` long ``[k]`` the first emitted token (already in ``s.root_token``
        and, with history, ``s.history``)."""

    def prefill_chunk(self, s, sl: slice, next_ids: torch.Tensor, starts: torch.Tensor, out) -> None:
        """After the target's prefill of a chunk that is not a prompt's last: ``out`` covers positions
        ``starts[b] + j``, and ``next_ids`` long ``[k, c]`` are the tokens after each of them."""

    def propose(self, s, n: int) -> Proposal:
        """Candidates for the first ``n`` slots, rooted at ``s.root_token``."""
        raise NotImplementedError

    def observe(self, s, n: int, verified: Verified) -> None:
        """Update the drafter's state from a verified round (the caches are already compacted)."""

    def fuse(self) -> None:
        """Prepare weights for inference (idempotent)."""

    def ensure_positions(self, num_positions: int) -> None:
        """Grow rotary tables to cover ``num_positions`` (drafters with their own attention)."""


_CHAINS: dict = {}


def chain_tree(tokens: torch.Tensor) -> DraftTree:
    """A chain: ``tokens`` long ``[n, T]`` (root first), node ``i``'s parent ``i - 1``. Its structure is a
    constant, built once per length and device."""
    from .tree_build import static_structure

    t = tokens.shape[1]
    key = (t, str(tokens.device))
    if key not in _CHAINS:
        _CHAINS[key] = static_structure(list(range(-1, t - 1)), tokens.device)
    return _CHAINS[key].with_tokens(tokens)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]``: ``[B, T, F]`` and long ``[B, N]`` -> ``[B, N, F]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
