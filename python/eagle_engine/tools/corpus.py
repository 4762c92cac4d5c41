"""Text corpora: the demo's standard-library corpus with its train/held-out split, corpus files and
directories in the formats `eagle train-draft` and `eagle bench` read, and their token streams.

Corpus formats (:func:`read_documents`): each path is a file or a directory (its files, recursively, sorted by
path; hidden files skipped). A ``.jsonl`` file holds one JSON object per line whose ``text`` field is a
document, a ``.json`` file a list of such objects; any other file is UTF-8 text (undecodable bytes
replaced): one document, or several separated by ``doc_separator`` (e.g. ``"<|endoftext|>"`` or
``"\n\n\n"``). Empty documents are skipped and counted.
In a token stream (:func:`token_stream`) every document starts with the tokenizer's BOS token if it has one.

Corpus split (written down so that every number quoted for the demo can be reproduced): every ``.py`` file
under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path, minus test suites, IDLE, site-packages
and the ``encodings`` codec tables; files of top-level modules/packages whose name starts with ``s`` (shutil,
socket, subprocess, ssl, statistics, string, ...) are **held out** for evaluation, all others train.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass, field

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


def prompt_pool(texts: list[str], chars: int) -> list[str]:
    """The texts :func:`code_prompts` cuts ``chars``-character prompts from: those of at least
    ``2 * chars``."""
    return [t for t in texts if len(t) >= 2 * chars]


# ------------------------------------------------------------------------------------ corpus formats


@dataclass
class Corpus:
    """Documents read from corpus paths, with what was read and what was skipped (never silently)."""

    documents: list[str]
    files: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def describe(self) -> str:
        line = f"{len(self.documents)} document(s) from {len(self.files)} file(s)"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return line


def corpus_files(paths: list[str], flag: str = "--corpus") -> list[str]:
    """Every file ``paths`` name: files as given, directories expanded (recursively, sorted, no hidden)."""
    if not paths:
        raise TrainingInputError(f"{flag}: no corpus path given")
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(os.path.join(dirpath, n) for n in filenames if not n.startswith("."))
            if not found:
                raise TrainingInputError(f"{flag}: directory {path} holds no files")
            files.extend(sorted(found))
        else:
            raise TrainingInputError(f"{flag}: corpus file or directory not found: {path}")
    return files


def read_documents(paths: list[str], doc_separator: str | None = None, flag: str = "--corpus") -> Corpus:
    """The documents of ``paths`` (see the module docstring for the formats); raises
    :class:`TrainingInputError` naming ``flag`` when a path is missing or unreadable or no document is
    left."""
    if doc_separator == "":
        raise TrainingInputError("--doc-separator must not be empty")
    files = corpus_files(paths, flag)
    corpus = Corpus([], files)
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise TrainingInputError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
        if path.endswith(".jsonl"):
            docs = _jsonl_texts(path, text, corpus.skipped, flag)
        elif path.endswith(".json") and text.lstrip().startswith("["):
            docs = _json_list_texts(path, text, corpus.skipped, flag)
        else:
            docs = text.split(doc_separator) if doc_separator else [text]
        for doc in docs:
            if doc.strip():
                corpus.documents.append(doc)
            else:
                corpus.skipped["empty document(s)"] = corpus.skipped.get("empty document(s)", 0) + 1
    if not corpus.documents:
        raise TrainingInputError(f"{flag}: the corpus is empty ({len(files)} file(s), no text)")
    return corpus


def _jsonl_texts(path: str, text: str, skipped: dict, flag: str) -> list[str]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TrainingInputError(f"{flag}: {path} line {n} is not JSON: {e.msg}") from None
    return _texts(records, skipped)


def _json_list_texts(path: str, text: str, skipped: dict, flag: str) -> list[str]:
    """The ``text`` fields of a ``.json`` file holding a list of records."""
    try:
        return _texts(json.loads(text), skipped)
    except json.JSONDecodeError as e:
        raise TrainingInputError(f"{flag}: {path} is not valid JSON: {e.msg} (line {e.lineno})") from None


def _texts(records: list, skipped: dict) -> list[str]:
    docs = []
    why = "JSON record(s) without a string 'text' field"
    for record in records:
        value = record.get("text") if isinstance(record, dict) else None
        if isinstance(value, str):
            docs.append(value)
        else:
            skipped[why] = skipped.get(why, 0) + 1
    return docs


def read_corpus(paths: list[str], doc_separator: str | None = None) -> list[str]:
    """The non-empty documents of ``paths`` (:func:`read_documents`' texts)."""
    return read_documents(paths, doc_separator).documents


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """``texts`` tokenized into one stream, each document preceded by BOS when the tokenizer has one."""
    stream = []
    bos = tokenizer.bos_token_id
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if bos is not None:
            stream.append(bos)
        stream.extend(ids)
    return stream
