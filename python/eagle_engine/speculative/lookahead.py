"""Lookahead decoding (Fu et al., 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead
Decoding"): Jacobi iteration over a window of future positions produces n-grams; n-grams that start with the
root are verified. Both branches ride in the same target forward, so no draft model exists.

One round's rows (``N = ngram``, ``W = window``, ``G = guesses``, ``K = N - 1``):

- the tree (rows ``0 .. T_v - 1``, ``T_v = 1 + G * K``): the root, then up to ``G`` pooled n-grams whose first
  token is the root, as chains of ``K`` tokens under it, merged where they share a prefix (a trie, so that the
  verifier's first-matching-sibling rule loses no candidate);
- the lookahead window (extra rows ``T_v + l * W + i``, never accepted): ``K`` levels of ``W`` columns. Level
  ``l`` column ``i`` sits at position ``len + 1 + i + l`` and sees the root, level-0 columns ``0 .. i`` and
  levels ``1 .. l`` of column ``i``: a contiguous run of positions ``len .. len + 1 + i + l``, which is one
  Jacobi trajectory. The tree's rows never see the window.

After the forward, the target's argmax at the last level's column ``i`` closes the n-gram ``(level_0[i],
..., level_{N-2}[i], out[i])``; the ``W`` n-grams go into the slot's pool, and the window shifts by one (level
``l`` takes level ``l + 1``, the last level the outputs), as the reference implementation's default
(``ALWAYS_FWD_ONE``) does whatever was accepted. For the first ``N - 2`` rounds after the prefill the upper
levels still hold the tokens the window started from (copied from the prompt), so no n-gram is inserted.

Compared with the reference implementation (hao-ai-lab/LookaheadDecoding), whose level 0 starts with the
root itself (``W - 1`` window tokens plus the root, so one of its ``W`` n-grams is keyed by the root), here
all ``W`` columns are window tokens at offsets ``1 .. W``; otherwise the mask, the positions, the shift and
the warm-up are the same. Its pool is an unbounded dict with LRU lists; here it is a fixed-size hash table on
the device (:func:`pool_insert`).
"""

from __future__ import annotations

import torch

import eagle_kernels as ops

from .drafter import Drafter, Proposal
from .tree_build import DraftTree, ancestor_bits


def pool_insert(pool: torch.Tensor, ptr: torch.Tensor, ngrams: torch.Tensor, enabled: torch.Tensor) -> None:
    """Insert each slot's n-grams into its pool, in place.

    Parameters
    ----------
    pool : int32 ``[B, buckets + 1, G, N]``: bucket ``t % buckets`` holds up to ``G`` n-grams starting with
        token ``t``, each stored whole (first token included; ``-1`` marks an empty entry); the last bucket is
        a scratch row that absorbs the writes of n-grams not inserted, and is never read
    ptr : int32 ``[B, buckets + 1]``: each bucket's ring write pointer
    ngrams : long ``[B, M, N]``
    enabled : bool ``[B]``: slots whose n-grams are inserted

    An n-gram already in its bucket (before this call) is not inserted again, nor is a repeat of an earlier
    one in ``ngrams``. The rest go in order: each at its bucket's pointer, which advances by one modulo ``G``
    (the oldest entry is replaced); when more than ``G`` land in one bucket, only the last ``G`` are written,
    so the result equals inserting one by one, deterministically (every write goes to a distinct entry).
    """
    b, m, n = ngrams.shape
    buckets, g = pool.shape[1] - 1, pool.shape[2]
    grams = ngrams.to(pool.dtype)
    bucket = ngrams[..., 0] % buckets  # [B, M]
    entries = torch.gather(pool, 1, bucket.view(b, m, 1, 1).expand(b, m, g, n))  # [B, M, G, N]
    in_pool = (entries == grams.unsqueeze(2)).all(-1).any(-1)
    earlier = torch.ones(m, m, dtype=torch.bool, device=pool.device).tril(-1)  # [w, w']: w' < w
    repeat = ((grams.unsqueeze(2) == grams.unsqueeze(1)).all(-1) & earlier).any(-1)
    keep = enabled.view(b, 1) & ~in_pool & ~repeat
    # together[w, w']: w' is kept and shares w's bucket
    together = (bucket.unsqueeze(2) == bucket.unsqueeze(1)) & keep.unsqueeze(1)
    rank = (together & earlier).sum(-1)
    count = together.sum(-1)
    keep = keep & (rank >= count - g)
    start = torch.gather(ptr, 1, bucket).long()
    entry = torch.where(keep, bucket * g + (start + rank) % g, buckets * g)
    pool.view(b, -1, n).scatter_(1, entry.unsqueeze(-1).expand(b, m, n), grams)
    ptr.scatter_(1, torch.where(keep, bucket, buckets), ((start + count) % g).to(ptr.dtype))


def pool_lookup(pool: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of each root's bucket: ``pool`` as in :func:`pool_insert`, ``root`` long ``[B]``.

    Returns ``(tokens, valid)``: long ``[B, G, N - 1]``, the tokens after the first of each entry, and bool
    ``[B, G]``, whether the entry starts with the root (else its tokens are the root repeated: some tokens,
    which the verifier rejects or, when they happen to be right, accepts)."""
    b, buckets, g, n = pool.shape[0], pool.shape[1] - 1, pool.shape[2], pool.shape[3]
    bucket = (root % buckets).view(b, 1, 1, 1).expand(b, 1, g, n)
    entries = torch.gather(pool, 1, bucket)[:, 0].long()  # [B, G, N]
    valid = entries[..., 0] == root.view(b, 1)
    tokens = torch.where(valid.unsqueeze(-1), entries[..., 1:], root.view(b, 1, 1))
    return tokens, valid


def trie_parents(chains: torch.Tensor) -> torch.Tensor:
    """Parents of the tree ``root + chains`` with shared prefixes merged: ``chains`` long ``[B, G, K]``
    (node ``1 + g * K + j`` is chain ``g``'s ``j``-th token). int32 ``[B, 1 + G * K]``, -1 at the root.

    Chain ``g``'s node ``j`` hangs under the node ``j - 1`` of the first chain with the same first ``j``
    tokens. A node repeating an earlier chain's prefix thus becomes a sibling with the same token as that
    chain's node: never taken (the first matching sibling wins), and its children move to the first one."""
    b, g, k = chains.shape
    same_prefix = torch.cumprod((chains.unsqueeze(2) == chains.unsqueeze(1)).int(), -1)  # [B, g, g', K]
    first = same_prefix.argmax(2)  # [B, G, K]: the first chain g' sharing chain g's prefix up to j
    steps = torch.arange(k, device=chains.device)
    canonical = 1 + first * k + steps  # node of that prefix
    parents = torch.cat([torch.zeros_like(canonical[..., :1]), canonical[..., :-1]], -1)
    root = torch.full((b, 1), -1, dtype=torch.long, device=chains.device)
    return torch.cat([root, parents.reshape(b, g * k)], 1).to(torch.int32)


def window_mask(window: int, levels: int, tree_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window rows' attention and positions. Returns bool ``[T, T]`` (``T = tree_rows + levels *
    window``; tree rows all False) and long ``[T - tree_rows]`` offsets (position minus committed length)."""
    t = tree_rows + levels * window
    mask = torch.zeros(t, t, dtype=torch.bool)
    offsets = torch.zeros(levels * window, dtype=torch.long)
    for level in range(levels):
        for i in range(window):
            row = tree_rows + level * window + i
            mask[row, 0] = True
            mask[row, tree_rows : tree_rows + i + 1] = True
            for upper in range(1, level + 1):
                mask[row, tree_rows + upper * window + i] = True
            offsets[row - tree_rows] = 1 + i + level
    return mask, offsets


class LookaheadDrafter(Drafter):
    """Lookahead decoding under a :class:`~.methods.LookaheadConfig` (see the module docstring).

    Per-slot state on the device: the window, long ``[N - 1, W]``; the n-gram pool, int32 ``[buckets + 1, G,
    N]`` (the last bucket is scratch); the ring pointers, int32 ``[buckets + 1]``; a round counter (warm-up).
    That is ``4 * (buckets + 1) * (G * N + 1) + 8 * (N - 1) * W + 8`` bytes per slot, fixed whatever the
    length: 590,200 bytes (576 KiB) at the defaults (``buckets=4096, G=7, N=5, W=7``). The pool keeps at most
    ``G`` n-grams per bucket; a bucket is shared by the tokens equal modulo ``buckets`` (an entry stores its
    first token, so a lookup returns only n-grams starting with the root)."""

    method = "lookahead"

    def __init__(self, settings):
        self.settings = settings
        cfg = settings
        self.levels = cfg.ngram - 1
        self.tree_rows = 1 + cfg.guesses * self.levels
        self.window = self.pool = self.ptr = self.rounds = None

    @property
    def width(self) -> int:
        return self.settings.ngram

    @property
    def rows(self) -> int:
        return self.tree_rows + self.settings.window * self.levels

    def bind(self, target, max_batch: int, max_len: int, pool=None) -> None:
        cfg, dev = self.settings, target.lm_head_weight.device
        self.window = torch.zeros(max_batch, self.levels, cfg.window, dtype=torch.long, device=dev)
        self.pool = torch.full((max_batch, cfg.pool_buckets + 1, cfg.guesses, cfg.ngram), -1,
                               dtype=torch.int32, device=dev)
        self.ptr = torch.zeros(max_batch, cfg.pool_buckets + 1, dtype=torch.int32, device=dev)
        self.rounds = torch.zeros(max_batch, dtype=torch.long, device=dev)
        mask, offsets = window_mask(cfg.window, self.levels, self.tree_rows)
        self._window_bits = ops.pack_tree_mask(mask.to(dev))[0, self.tree_rows :]  # [W * K, words]
        self._window_offsets = offsets.to(dev)
        depths = torch.arange(self.levels, device=dev).repeat(cfg.guesses) + 1
        self._depths = torch.cat([depths.new_zeros(1), depths]).view(1, -1)

    def per_slot(self) -> list[torch.Tensor]:
        return [self.window, self.pool, self.ptr, self.rounds]

    def prefill(self, s, sl, ids, prompt_lens, starts, out, first) -> None:
        # The window starts from the prompt's tokens, in order and cycling (the reference implementation
        # picks prompt tokens at random).
        k = ids.shape[0]
        cells = torch.arange(self.levels * self.settings.window, device=ids.device).view(1, -1)
        picks = torch.remainder(cells, prompt_lens.long().view(k, 1))
        self.window[sl] = torch.gather(ids, 1, picks).view(k, self.levels, -1)
        self.pool[sl] = -1
        self.ptr[sl] = 0
        self.rounds[sl] = 0

    def propose(self, s, n: int) -> Proposal:
        root = s.root_token[:n]
        chains, _ = pool_lookup(self.pool[:n], root)
        parents = trie_parents(chains)
        tree = DraftTree(torch.cat([root.view(n, 1), chains.reshape(n, -1)], 1), parents,
                         self._depths.expand(n, -1), ancestor_bits(parents, self.levels))
        words = self._window_bits.shape[-1]
        tree_bits = torch.nn.functional.pad(tree.packed_mask, (0, words - tree.packed_mask.shape[-1]))
        packed = torch.cat([tree_bits, self._window_bits.expand(n, -1, -1)], 1)
        tokens = torch.cat([tree.tokens, self.window[:n].reshape(n, -1)], 1)
        offsets = torch.cat([tree.depths, self._window_offsets.expand(n, -1)], 1)
        return Proposal(tree, tokens, offsets, packed)

    def observe(self, s, n: int, v) -> None:
        cfg = self.settings
        out = v.logits[:, -cfg.window :].argmax(-1)  # the last level's outputs, [n, W]
        window = self.window[:n]
        ngrams = torch.cat([window.transpose(1, 2), out.unsqueeze(-1)], -1)  # [n, W, N]
        warm = self.rounds[:n] >= self.levels - 1
        pool_insert(self.pool[:n], self.ptr[:n], ngrams, warm & s.active[:n])
        window.copy_(torch.cat([window[:, 1:], out.unsqueeze(1)], 1))
        self.rounds[:n] += 1
