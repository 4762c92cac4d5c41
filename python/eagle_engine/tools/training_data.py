"""Training rows for draft heads: token rows of one length and the positions the loss covers.

``loss_mask[n, j]`` is True when the loss covers what position ``j`` predicts: the token at ``j + 1`` (the
head's row ``i``, which pairs feature ``i`` with token ``i + 1``, predicts the distribution after position
``i + 1``, so it is weighted by ``loss_mask[:, i + 1]``). Text corpora: every position. Conversations: the
positions whose next token is an assistant token, so only the assistant's tokens are learned.

Conversations get a row each (right-padded: the target is causal, so padding changes nothing before it).
One longer than ``seq_len`` is cut after the last assistant message that fits; failing that, inside the
turn at ``seq_len``; one with no assistant token within ``seq_len`` is skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import TrainingInputError
from .chat_template import render
from .corpus import token_stream


@dataclass
class TrainingRows:
    """``ids`` long ``[N, T]``; ``loss_mask`` bool ``[N, T]`` (see the module docstring)."""

    ids: torch.Tensor
    loss_mask: torch.Tensor
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ids.shape != self.loss_mask.shape or self.ids.dim() != 2:
            raise ValueError(
                f"ids {tuple(self.ids.shape)} and loss_mask {tuple(self.loss_mask.shape)} differ"
            )

    @classmethod
    def unmasked(cls, ids: torch.Tensor) -> TrainingRows:
        """Rows whose every position is trained (text)."""
        return cls(ids, torch.ones_like(ids, dtype=torch.bool))

    def __len__(self) -> int:
        return self.ids.shape[0]


def text_rows(tokenizer, texts: list[str], seq_len: int) -> TrainingRows:
    """Tokenize ``texts`` into one stream (:func:`~.corpus.token_stream`) cut into non-overlapping rows."""
    stream = token_stream(tokenizer, texts)
    n = len(stream) // seq_len
    if n == 0:
        raise TrainingInputError(
            f"the corpus has {len(stream)} tokens: fewer than one sequence of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TrainingRows.unmasked(ids)


def _cut(rendered, seq_len: int) -> tuple[int, str] | None:
    """How many tokens of a rendered conversation to keep and why; None to skip it."""
    n = len(rendered.ids)
    if n <= seq_len:
        return n, "whole"
    fits = [end for end in rendered.answer_ends if end <= seq_len]
    if fits:
        return max(fits), "cut at a turn boundary"
    if any(rendered.assistant[1:seq_len]):
        return seq_len, "cut inside a turn"
    return None


def pad_token_id(tokenizer) -> int:
    """The id padding rows are filled with (never trained: the loss mask is False there)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def chat_rows(tokenizer, conversations, seq_len: int) -> TrainingRows:
    """One ``seq_len`` row per usable conversation (see the module docstring); ``report`` counts how many
    were used whole, cut (at a turn boundary, inside a turn) and skipped, and how many spans came from
    the content-search fallback of :mod:`.chat_template`."""
    from jinja2 import TemplateError

    counts = Counter()
    pad = pad_token_id(tokenizer)
    ids, masks = [], []
    for conversation in conversations:
        try:
            rendered = render(tokenizer, conversation.messages)
        except TemplateError:  # e.g. a template that allows no system role, or needs alternating roles
            counts["skipped: the chat template refused it"] += 1
            continue
        if not rendered.stable:
            counts["assistant spans found by content search"] += 1
        cut = _cut(rendered, seq_len)
        if cut is None:
            counts["skipped: no assistant token within --seq-len"] += 1
            continue
        keep, how = cut
        counts[how] += 1
        row = rendered.ids[:keep] + [pad] * (seq_len - keep)
        trained = rendered.assistant[1:keep] + [False] * (seq_len - keep + 1)
        ids.append(row)
        masks.append(trained)
    if not ids:
        raise TrainingInputError(
            f"no conversation has an assistant token within --seq-len {seq_len}: {dict(counts)}"
        )
    rows = TrainingRows(torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.bool))
    rows.report = {
        "conversations": dict(counts),
        "rows": len(ids),
        "trained_tokens": int(rows.loss_mask.sum()),
    }
    return rows


def token_frequencies(rows: TrainingRows, vocab_size: int) -> torch.Tensor:
    """Counts ``[vocab_size]`` of the tokens the loss covers (the token after each trained position)."""
    trained = rows.ids[:, 1:][rows.loss_mask[:, :-1]]
    return torch.bincount(trained.flatten(), minlength=vocab_size)[:vocab_size]


def read_rows(
    tokenizer,
    paths: list[str],
    seq_len: int,
    *,
    data_format: str | None = None,
    doc_separator: str | None = None,
    chat_template: str | None = None,
    model_dir: str = "",
    flag_name: str = "--data",
) -> TrainingRows:
    """The training rows of ``paths`` in ``data_format`` (None: detected, see :mod:`.conversations`): text
    cut into rows, or conversations rendered with the chat template (``chat_template``: a Jinja file that
    replaces the tokenizer's). ``report`` says what was read, used, cut and skipped."""
    from .chat_template import apply_template_file
    from .conversations import DATA_FORMATS, detect_format, read_conversations
    from .corpus import read_documents

    if data_format is not None and data_format not in DATA_FORMATS:
        raise TrainingInputError(
            f"unknown --data-format {data_format!r}: use one of {', '.join(DATA_FORMATS)}"
        )
    fmt = data_format or detect_format(paths, flag_name)
    if fmt == "text":
        if chat_template is not None:
            raise TrainingInputError(
                "--chat-template is for conversation data (sharegpt, messages), not text"
            )
        corpus = read_documents(paths, doc_separator, flag_name)
        rows = text_rows(tokenizer, corpus.documents, seq_len)
        rows.report = {"format": "text", "corpus": corpus.describe(), "rows": len(rows)}
        return rows
    if doc_separator is not None:
        raise TrainingInputError("--doc-separator is for text data, not conversations")
    apply_template_file(tokenizer, chat_template, model_dir)
    found = read_conversations(paths, fmt, flag_name)
    rows = chat_rows(tokenizer, found.conversations, seq_len)
    rows.report = {"format": fmt, "read": found.describe(), **rows.report}
    return rows
