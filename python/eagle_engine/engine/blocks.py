"""The host side of a paged KV cache: which blocks each sequence owns, which are free, and which hold a
prompt prefix another request can reuse.

A runner's caches (the target's, and an EAGLE head's) share one block table, so one :class:`BlockManager`
hands out block ids for all of them. A sequence owns enough blocks for its committed rows plus the rows a
round writes past them (its tree); it gets more as it grows and gives them all back when it leaves.

Prefix caching: once a prompt is prefilled, each of its full blocks is keyed by a hash of its tokens and
of everything before them, and of the one token after it (an EAGLE head's last row of a block pairs that
row's feature with the next token, so the block's draft rows depend on it). A new prompt whose leading
blocks have known keys takes those blocks (reference counts) and computes only the rest; at least one
token is always computed (its logits give the first new token). A block nobody references stays cached
until its id is needed: free blocks are handed out first, then cached ones, least recently used first.
Shared blocks are only ever read: a sequence writes rows at or past its prompt's end, which is never inside
a full block it shares. A prompt's last, partly filled block is cached too, with its tokens: a later prompt
that continues the same full blocks and starts with some of those tokens gets a copy of it (copy on write:
it will write its own rows into that block) and computes only the rows after the shared ones.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

from ..errors import EagleError


class OutOfBlocks(EagleError):
    """The pool has too few free blocks for a request (it waits, or a running sequence is preempted)."""


class KVCacheTooSmallError(EagleError):
    """A request could never fit the KV cache pool, even alone (HTTP 503)."""


@dataclass
class PrefixStats:
    """Prefix-cache counters: prompt ``queries`` and ``hits`` in tokens (the tokens looked up and found)."""

    queries: int = 0
    hits: int = 0


def block_keys(tokens: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The cache keys of the full blocks of ``tokens`` that have a token after them: key ``k`` hashes key
    ``k - 1``, block ``k``'s tokens and the token after the block."""
    keys = []
    for k in range((len(tokens) - 1) // block_size):
        chunk = tokens[k * block_size : (k + 1) * block_size + 1]
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b",".join(str(t).encode() for t in chunk))
        parent = h.digest()
        keys.append(parent)
    return keys


class BlockManager:
    """Block ids ``0 .. num_blocks - 1`` of a pool of ``block_size``-row blocks (see the module docstring).
    Sequences are identified by any hashable key (the runner uses :class:`Sequence` objects)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise EagleError(f"a pool needs >= 1 blocks of >= 1 rows, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free = deque(range(num_blocks))  # never used, or freed without a key
        self._refs = [0] * num_blocks
        self._owned: dict[object, list[int]] = {}
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: LRU first
        self._partial_of: dict[bytes, tuple[int, tuple[int, ...]]] = {}  # parent key -> (block, its tokens)
        self._partial_parent: dict[int, bytes] = {}  # a cached partly filled block -> its parent key
        self.stats = PrefixStats()

    # ------------------------------------------------------------------------------------------ queries

    def blocks_for(self, rows: int) -> int:
        return -(-rows // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.num_free

    def blocks(self, key) -> list[int]:
        """The blocks ``key`` owns, in logical order."""
        return self._owned.get(key, [])

    def _lookup(self, tokens: list[int]) -> tuple[list[int], tuple[int, int] | None]:
        """``(full blocks, (partly filled block, rows of it to copy) or None)`` of ``tokens``' longest
        cached prefix; at least the last token's row is left to compute."""
        found, parent = [], b""
        if not self.prefix_caching:
            return found, None
        for k in block_keys(tokens, self.block_size):
            block = self._block_of.get(k)
            if block is None:
                break
            found.append(block)
            parent = k
        entry = self._partial_of.get(parent)
        if entry is None:
            return found, None
        block, cached = entry
        start, common = len(found) * self.block_size, 0
        for a, b in zip(cached, tokens[len(found) * self.block_size :]):
            if a != b:
                break
            common += 1
        # Row i is reusable when tokens up to i + 1 match (a draft row pairs row i with token i + 1).
        rows = min(common - 1, len(tokens) - 1 - start)
        return found, ((block, rows) if rows >= 1 else None)

    def cost(self, tokens: list[int], rows: int) -> int:
        """Free blocks that starting a sequence on ``tokens`` with ``rows`` rows in all would take: its
        blocks less its cached prefix's, plus those of the prefix nobody references (they stop being
        free)."""
        cached = self._lookup(tokens)[0]
        return self.blocks_for(rows) - len(cached) + sum(1 for b in cached if self._refs[b] == 0)

    # ----------------------------------------------------------------------------------------- changes

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)  # the least recently used cached block
            self._forget(block)
        self._refs[block] = 1
        return block

    def _forget(self, block: int) -> None:
        """``block`` no longer holds a cached prefix (its id is handed out again)."""
        if block in self._key_of:
            del self._block_of[self._key_of.pop(block)]
        if block in self._partial_parent:
            del self._partial_of[self._partial_parent.pop(block)]

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of or block in self._partial_parent:
                self._evictable[block] = None  # kept for a later prompt, evicted last-used-last
            else:
                self._free.append(block)

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def match_prefix(self, key, tokens: list[int]) -> tuple[int, tuple[int, int] | None]:
        """Start ``key`` (a sequence with no blocks yet) on the cached blocks of ``tokens``' longest cached
        prefix. Returns ``(rows, copy)``: the rows they hold (less than ``len(tokens)``), and ``(src, dst)``
        when the last of them come from a partly filled block: the caller copies block ``src`` into ``dst``,
        the sequence's own (copy on write)."""
        if key in self._owned:
            raise EagleError("match_prefix: the sequence already holds blocks")
        found, partial = self._lookup(tokens)
        for block in found:
            self._ref(block)
        self._owned[key] = found
        rows, copy = len(found) * self.block_size, None
        if partial is not None:
            src, extra = partial
            self._ref(src)  # (not evicted for its own copy)
            if self.num_free:
                dst = self._take()
                found.append(dst)
                rows, copy = rows + extra, (src, dst)
            self._unref(src)
        if self.prefix_caching:
            self.stats.queries += len(tokens)
            self.stats.hits += rows
        return rows, copy

    def grow(self, key, rows: int) -> bool:
        """Give ``key`` blocks for ``rows`` rows in all; False (and nothing taken) when too few are free."""
        have = self._owned.setdefault(key, [])
        need = self.blocks_for(rows) - len(have)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        have.extend(self._take() for _ in range(need))
        return True

    def register_prefix(self, key, tokens: list[int]) -> None:
        """Key the full blocks of ``tokens`` (a prompt whose rows ``key`` has computed) for later prompts, and
        keep its last, partly filled block with its tokens."""
        if not self.prefix_caching:
            return
        owned = self._owned[key]
        keys = block_keys(tokens, self.block_size)
        for k, digest in enumerate(keys):
            block = owned[k]
            if block in self._key_of or digest in self._block_of:
                continue  # already cached (this block, or the same content in another one)
            self._key_of[block] = digest
            self._block_of[digest] = block
        tail = tuple(tokens[len(keys) * self.block_size :])
        last = owned[len(keys)]
        if len(tail) >= 2 and last not in self._key_of and last not in self._partial_parent:
            parent = keys[-1] if keys else b""
            old = self._partial_of.get(parent)
            if old is not None and len(old[1]) >= len(tail):
                return  # the cached one reaches as far
            if old is not None:
                self._forget(old[0])
                if self._refs[old[0]] == 0:
                    del self._evictable[old[0]]
                    self._free.append(old[0])
            self._partial_of[parent] = (last, tail)
            self._partial_parent[last] = parent

    def release(self, key) -> None:
        """Give back every block ``key`` owns (cached ones stay cached while unreferenced)."""
        for block in reversed(self._owned.pop(key, [])):  # the last blocks are evicted first
            self._unref(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay in use)."""
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._key_of.clear()
        self._block_of.clear()
        self._partial_of.clear()
        self._partial_parent.clear()
