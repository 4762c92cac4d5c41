"""Text corpora: the demo's standard-library corpus with its train/held-out split, and corpus files.

Corpus split (written down so that every number quoted for the demo can be reproduced): every ``.py`` file
under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path, minus test suites, IDLE, site-packages
and the ``encodings`` codec tables; files of top-level modules/packages whose name starts with ``s`` (shutil,
socket, subprocess, ssl, statistics, string, ...) are **held out** for evaluation, all others train.
"""

from __future__ import annotations

import os
import random
import sysconfig

from ..errors import EagleError, TrainingInputError

HELD_OUT_PREFIXES = ("s",)
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings"}
)
SPLITS = ("train", "heldout")


def stdlib_files(split: str, root: str | None = None) -> list[str]:
    """Sorted paths of the standard library's ``.py`` files in ``split`` (``"train"`` or ``"heldout"``).

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``; the list depends on the Python version.
    """
    if split not in SPLITS:
        raise EagleError(f"unknown corpus split {split!r}; use one of {SPLITS}")
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    found.sort()
    held = [rel for rel in found if rel.lower().startswith(HELD_OUT_PREFIXES)]
    chosen = held if split == "heldout" else [rel for rel in found if rel not in set(held)]
    if not chosen:
        raise EagleError(f"no standard-library sources found for split {split!r} under {root}")
    return [os.path.join(root, rel) for rel in chosen]



def code_prompts(texts: list[str], n: int, chars: int = 400, seed: int = 0) -> list[str]:
    """``n`` prompts cut from ``texts``: ``chars`` characters ending at a line end, from seeded random spots.

    The newline itself is left out: byte-level BPE merges a newline with the next line's indentation, so a
    prompt ending in ``"\n"`` would force the continuation to start a top-level line. Deterministic for a
    given ``seed``; files shorter than ``2 * chars`` are skipped.
    """
    if n < 1 or chars < 1:
        raise EagleError(f"need n >= 1 and chars >= 1, got n={n}, chars={chars}")
    pool = [t for t in texts if len(t) >= 2 * chars]
    if not pool:
        raise EagleError(f"no text of at least {2 * chars} characters to cut prompts from")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = pool[rng.randrange(len(pool))]
        end = rng.randrange(chars, len(text) - chars // 2)
        end = text.find("\n", end)
        end = len(text) if end < 0 else end
        prompts.append(text[max(0, end - chars) : end])
    return prompts


def read_corpus(paths: list[str]) -> list[str]:
    """The non-empty texts of ``paths`` (UTF-8, undecodable bytes replaced)."""
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            texts.append(text)
    if not texts:
        raise TrainingInputError(f"the corpus is empty ({len(paths)} file(s), no text)")
    return texts
