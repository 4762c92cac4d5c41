"""Incremental detokenisation: turn a growing list of token ids into text pieces, never a broken character.

Byte-level BPE tokens can split a multi-byte UTF-8 character; decoding such a prefix gives U+FFFD. So each
push decodes a short window (the last few already-emitted ids plus the new ones) and emits the difference to
the window's previous text, holding everything back while the text ends in U+FFFD.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"
_PROMPT_WINDOW = 6  # prompt ids decoded before the first new ones, so a first token's leading space survives


class IncrementalDetokenizer:
    """``push(new_ids) -> str`` the text the new ids complete; ``flush() -> str`` whatever is held back.

    The concatenation of every ``push`` and the final ``flush`` equals the decoding of all new ids after the
    prompt (special tokens skipped).
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_WINDOW:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.ids)  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        if not text.startswith(prefix_text):  # a window start that re-decodes differently: emit the tail
            common = 0
            while common < min(len(text), len(prefix_text)) and text[common] == prefix_text[common]:
                common += 1
            prefix_text = prefix_text[:common]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix_text) :]

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(int(t) for t in new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)
