"""torch's CPU threads: the default the ``eagle`` commands and :meth:`EagleEngine.from_pretrained` share."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import EagleError

log = logging.getLogger("eagle_engine")


def default_threads() -> int:
    """CPU threads when none are given: half the cores, at least 1, at most 4.

    Half: a machine shared with other jobs (CI, a laptop, a 2-core box) keeps cores free instead of stalling
    (torch's own default, every core, made a loaded 2-core machine ~140x slower); at most 4: the engine's CPU
    work is small matrix-vector products, where more threads mostly add hand-offs.
    """
    return min(4, max(1, (os.cpu_count() or 1) // 2))


def set_threads(n: int | None) -> int:
    """Set torch's intra-op CPU threads (process-wide) to ``n``, or to :func:`default_threads` for None;
    returns the number set."""
    chosen = default_threads() if n is None else n
    if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 1:
        raise EagleError(f"threads must be a whole number >= 1, got {n!r}")
    torch.set_num_threads(chosen)
    if n is None:
        log.info("torch CPU threads: %d (the default: min(4, max(1, cores // 2)))", chosen)
    return chosen
