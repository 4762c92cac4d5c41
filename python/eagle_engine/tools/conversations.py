"""Conversation data: ShareGPT and OpenAI-style ``messages`` files read into one form, and written back.

Formats (:func:`detect_format`):
- ``sharegpt``: a JSON list, or JSONL, of objects with ``conversations: [{"from": ..., "value": ...}]``;
  ``from`` is ``system``, ``human``/``user`` or ``gpt``/``assistant``/``chatgpt`` (other senders are skipped
  with their conversation, and counted).
- ``messages``: a JSON list, or JSONL, of objects with ``messages: [{"role": ..., "content": ...}]``, roles
  ``system``, ``user`` and ``assistant``.
- ``text``: anything else (plain text files; JSONL with a ``text`` field): read by :mod:`.corpus`.

Every conversation becomes a :class:`Conversation` of ``{"role", "content"}`` messages. A conversation is
skipped, and counted with its reason, when it is malformed or holds no assistant message.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from ..errors import TrainingInputError
from .corpus import corpus_files

DATA_FORMATS = ("text", "sharegpt", "messages")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One conversation: ``messages`` of ``{"role": "system"|"user"|"assistant", "content": str}``; ``id``
    is the record's own ``id`` when it has one, else ``"<file>:<index>"``."""

    messages: list[dict]
    id: str


@dataclass
class ConversationSet:
    """What :func:`read_conversations` found: the conversations, and the skipped ones by reason."""

    conversations: list[Conversation]
    format: str
    files: int
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{len(self.conversations)} conversation(s) in {self.files} {self.format} file(s)" + (
            f"; {skipped} skipped ({why})" if skipped else ""
        )


def _records(path: str):
    """The JSON records of a ``.json`` list or a ``.jsonl`` file (a bad line names its file and line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainingInputError(f"{path}: not valid JSON: {e}") from None
        yield from enumerate(data)
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield line_no - 1, json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingInputError(f"{path}:{line_no}: not valid JSON: {e}") from None


def _record_format(record, path: str, flag_name: str) -> str:
    if isinstance(record, dict):
        for key, fmt in (("conversations", "sharegpt"), ("messages", "messages"), ("text", "text")):
            if key in record:
                return fmt
        keys = ", ".join(sorted(map(str, record))[:8])
        raise TrainingInputError(
            f"{flag_name}: {path} holds records with neither 'conversations' (ShareGPT), 'messages' nor "
            f"'text' (its first has: {keys}); convert them to one of those formats"
        )
    return "text"


def _is_record_list(path: str) -> bool:
    """A ``.jsonl`` file, or a ``.json`` file holding a list: records (any other JSON file is text)."""
    if path.endswith(".jsonl"):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith("[")


def detect_format(paths: list[str], flag_name: str = "--data") -> str:
    """``"sharegpt"``, ``"messages"`` or ``"text"``: from the first record of each ``.jsonl`` file and
    ``.json`` list (other files are text). Records of none of these formats, and files of mixed formats, are
    errors."""
    found = set()
    for path in corpus_files(paths, flag_name):
        if not path.endswith((".json", ".jsonl")) or not _is_record_list(path):
            found.add("text")
            continue
        for _, record in _records(path):
            found.add(_record_format(record, path, flag_name))
            break
    if len(found) > 1:
        raise TrainingInputError(
            f"{flag_name}: the files mix data formats ({', '.join(sorted(found))}); give one format at a time"
        )
    return found.pop() if found else "text"


def _normalise(record, fmt: str) -> list[dict] | str:
    """The record's messages, or the reason it is skipped."""
    if not isinstance(record, dict):
        return "not an object"
    turns = record.get("conversations" if fmt == "sharegpt" else "messages")
    if not isinstance(turns, list) or not turns:
        return "no messages"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return "a message is not an object"
        if fmt == "sharegpt":
            role, content = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()), turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
            role = role if role in ROLES else None
        if role is None:
            return "unknown sender"
        if not isinstance(content, str):
            return "content not a string"
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "no assistant message"
    return messages


def read_conversations(
    paths: list[str], fmt: str | None = None, flag_name: str = "--data"
) -> ConversationSet:
    """Every conversation in ``paths`` (files or directories, as :func:`~.corpus.corpus_files` lists them)
    in format ``fmt`` (None: :func:`detect_format`)."""
    fmt = fmt or detect_format(paths, flag_name)
    if fmt not in ("sharegpt", "messages"):
        raise TrainingInputError(f"{flag_name}: {fmt!r} is not a conversation format (sharegpt, messages)")
    files = corpus_files(paths, flag_name)
    out = ConversationSet([], fmt, len(files))
    for path in files:
        for index, record in _records(path):
            messages = _normalise(record, fmt)
            if isinstance(messages, str):
                out.skipped[messages] += 1
                continue
            rid = record.get("id")
            out.conversations.append(
                Conversation(messages, str(rid) if rid is not None else f"{path}:{index}")
            )
    if not out.conversations:
        raise TrainingInputError(f"{flag_name}: no usable conversation found ({out.describe()})")
    return out


def conversation_record(conversation: Conversation) -> dict:
    """The ``messages``-format JSON record of ``conversation``."""
    return {"id": conversation.id, "messages": conversation.messages}


def write_conversations(path: str, conversations: list[Conversation]) -> None:
    """Write ``conversations`` as ``messages`` JSONL (atomically: a partial file never has the name)."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps(conversation_record(c), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
