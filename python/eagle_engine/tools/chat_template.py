"""Conversations rendered with the target tokenizer's chat template, with the tokens the loss covers.

:func:`render` turns messages into token ids, a per-token ``assistant`` flag and the token index where each
message ends. The assistant spans are found by rendering growing prefixes of the conversation: the text of
``messages[:k]`` with the generation prompt ends where assistant message ``k`` starts, and the text of
``messages[:k + 1]`` ends where it (and its end-of-turn marker) ends; both are prefixes of the whole
conversation's text in every template that renders earlier turns the same whatever follows. Where a template
does not (some rewrite earlier assistant turns, e.g. dropping reasoning), the span falls back to the
message's content found in the text, and the conversation is counted as such.
A token belongs to a span when its first character does (offsets from a fast tokenizer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import TrainingInputError


def apply_template_file(tokenizer, path: str | None, model_dir: str) -> None:
    """Set ``tokenizer.chat_template`` from the Jinja file ``path``; without one, require that the tokenizer
    has a template of its own (the error names ``--chat-template``)."""
    if path is not None:
        if not os.path.isfile(path):
            raise TrainingInputError(f"--chat-template: file not found: {path}")
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingInputError(
            f"the tokenizer in {model_dir} has no chat template to render conversations with; pass one with "
            "--chat-template FILE (a Jinja template, as in a tokenizer_config.json's 'chat_template')"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TrainingInputError(
            f"the tokenizer in {model_dir} is not a fast tokenizer (tokenizer.json): conversation data needs "
            "its character offsets to find the assistant's tokens"
        )


@dataclass
class Rendered:
    """``ids``: the conversation's tokens; ``assistant[i]``: token ``i`` is an assistant token (the loss
    covers its prediction); ``answer_ends``: tokens up to the end of each assistant message; ``stable``: the
    spans came from prefix renders (False: from content search)."""

    ids: list[int]
    assistant: list[bool]
    answer_ends: list[int]
    stable: bool


def _text(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _char_spans(tokenizer, messages: list[dict], full: str):
    """``(assistant spans [(start, end)], message end offsets, stable)`` in characters of ``full``."""
    ends, spans, stable = [], [], True
    for k, message in enumerate(messages):
        through = _text(tokenizer, messages[: k + 1])
        ends.append(len(through) if full.startswith(through) else None)
        if message["role"] != "assistant":
            continue
        before = _text(tokenizer, messages[:k], True) if k else ""
        if ends[-1] is not None and full.startswith(before) and len(before) <= len(through):
            spans.append((len(before), len(through)))
        else:
            stable = False
    if not stable or None in ends:  # fall back to searching each assistant message's content in order
        spans, cursor, stable = [], 0, False
        ends = []
        for message in messages:
            at = full.find(message["content"], cursor) if message["content"] else -1
            if at >= 0:
                cursor = at + len(message["content"])
                if message["role"] == "assistant":
                    spans.append((at, cursor))
            ends.append(cursor)
    return spans, ends, stable


def render(tokenizer, messages: list[dict]) -> Rendered:
    """Tokenize ``messages`` with the tokenizer's chat template (see the module docstring)."""
    full = _text(tokenizer, messages)
    spans, char_ends, stable = _char_spans(tokenizer, messages, full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    assistant = [any(a <= s < b for a, b in spans) for s in starts]
    answers = [end for end, m in zip(char_ends, messages) if m["role"] == "assistant"]
    answer_ends = [sum(1 for s in starts if s < end) for end in answers]
    return Rendered(list(enc["input_ids"]), assistant, answer_ends, stable)
