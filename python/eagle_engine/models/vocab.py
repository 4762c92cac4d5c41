"""Token frequency files and the draft vocabularies chosen from them.

A frequency file (written by ``eagle prepare-data --token-frequencies``) is JSON:
``{"vocab_size": V, "total": n, "counts": {"<token id>": count, ...} (non-zero only), "source": {...}}``.
:func:`most_frequent` picks a draft vocabulary from it: an EAGLE-3 head's ``d2t``/``t2d`` at training time,
or at inference the rows an EAGLE-1/2 head ranks its drafts over (:meth:`Eagle1Head.reduce_vocab`).
"""

from __future__ import annotations

import json

import torch

from ..errors import DraftMismatchError, ModelLoadError


def save_frequencies(path: str, counts: torch.Tensor, source: dict) -> None:
    """Write token ``counts`` ``[V]`` as a frequency file (see the module docstring)."""
    nonzero = counts.nonzero().flatten().tolist()
    data = {
        "vocab_size": counts.numel(),
        "total": int(counts.sum()),
        "source": source,
        "counts": {str(i): int(counts[i]) for i in nonzero},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def load_frequencies(path: str, vocab_size: int) -> torch.Tensor:
    """Token counts long ``[vocab_size]`` from a frequency file, checked against the vocabulary."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        declared = int(data["vocab_size"])
        counts = torch.zeros(max(declared, vocab_size), dtype=torch.long)
        for token, n in data["counts"].items():
            counts[int(token)] = int(n)
    except FileNotFoundError:
        raise ModelLoadError(f"token frequency file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ModelLoadError(f"{path} is not a token frequency file: {type(e).__name__}: {e}") from None
    if declared != vocab_size:
        raise DraftMismatchError(
            f"{path} counts tokens of a {declared}-token vocabulary; this model has {vocab_size}"
        )
    return counts


def most_frequent(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``counts`` ``[V]``, sorted ascending: long ``[size]``.
    Ties go to the lower id (deterministic)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= counts.numel():
        raise DraftMismatchError(
            f"a draft vocabulary of {size!r} tokens does not fit a {counts.numel()}-token vocabulary"
        )
    order = torch.sort(-counts.double(), stable=True).indices  # count descending; ids ascending in a tie
    return torch.sort(order[:size]).values
