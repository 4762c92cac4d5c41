"""Prompt-lookup decoding: the candidates are copied from the sequence itself.

Per slot, the last ``n`` tokens of the history (the root last) are searched for earlier in the history, for
``n`` from ``max_ngram`` down to ``min_ngram``; the longest ``n`` that occurs wins, and among its occurrences
the latest. The ``num_tokens`` tokens that followed that occurrence become a chain under the root. No model
runs: a round costs the target's forward over ``1 + num_tokens`` rows plus a scan of the history.

The scan is vectorised over slots and positions with shapes fixed by the history buffer (no host reads, a
fixed number of launches): ``E_k[e] = history[e - k] == history[len - k]``, and an ``n``-gram ends at ``e``
where ``E_0 .. E_{n-1}`` all hold (a running AND over ``k`` gives every ``n`` in one pass).
"""

from __future__ import annotations

import torch

from .drafter import Drafter, Proposal, chain_tree


def lookup_candidates(history: torch.Tensor, lengths: torch.Tensor, num_tokens: int, min_ngram: int,
                      max_ngram: int) -> torch.Tensor:
    """The continuation of each slot's latest, longest earlier match of its last n-gram.

    Parameters
    ----------
    history : long ``[B, L]``: ``history[b, :lengths[b] + 1]`` is the sequence, the root last (later
        columns are ignored)
    lengths : int ``[B]``: the root's index in ``history``
    num_tokens, min_ngram, max_ngram : as :class:`~.methods.PromptLookupConfig`

    Returns
    -------
    long ``[B, num_tokens]``. With the match ending at ``e`` (``e < len``), the tokens at ``e + 1, e + 2,
    ...``; when the history ends first (the match is ``d = len - e`` tokens back and ``d < num_tokens``) the
    copy continues with period ``d``: ``history[e + 1 + (k mod d)]``, what the repeat predicts. Without any
    match (``e = -1``) the same formula gives the sequence's first tokens: some tokens, simply rejected.
    """
    b, length = history.shape
    last = lengths.long().view(b, 1)
    pos = torch.arange(length, device=history.device).view(1, length)
    before_root = pos < last  # a match must end before the root: the suffix itself does not count
    running = torch.ones(b, length, dtype=torch.bool, device=history.device)
    best = torch.full((b, 1), -1, dtype=torch.long, device=history.device)
    for k in range(max_ngram):
        tail = torch.gather(history, 1, (last - k).clamp(min=0))  # the suffix's k-th token from the end
        eq = torch.nn.functional.pad(history[:, : length - k] == tail, (k, 0), value=False)
        running = running & eq  # running[e]: history[e - j] == history[len - j] for j <= k
        if k + 1 >= min_ngram:
            end = torch.where(running & before_root, pos, -1).amax(1, keepdim=True)
            best = torch.where(end >= 0, end, best)  # a longer n-gram that occurs wins
    period = last - best  # >= 1
    steps = torch.arange(num_tokens, device=history.device).view(1, num_tokens)
    return torch.gather(history, 1, best + 1 + torch.remainder(steps, period))


class PromptLookupDrafter(Drafter):
    """Prompt-lookup candidates (:class:`~.methods.PromptLookupConfig`) as a chain of ``num_tokens``. Keeps
    no state of its own: the round's token history (``s.history``) is all it reads."""

    method = "prompt_lookup"
    needs_history = True

    def __init__(self, settings):
        self.settings = settings

    @property
    def width(self) -> int:
        return self.settings.num_tokens + 1

    @property
    def rows(self) -> int:
        return self.settings.num_tokens + 1

    def propose(self, s, n: int) -> Proposal:
        cfg = self.settings
        lengths = s.tcache.lengths[:n]
        tokens = lookup_candidates(s.history[:n], lengths, cfg.num_tokens, cfg.min_ngram, cfg.max_ngram)
        return Proposal.of_tree(chain_tree(torch.cat([s.root_token[:n].view(n, 1), tokens], 1)))
