"""Token ids -> text, a few at a time, exactly as decoding the whole sequence at once would give it.

Decoding new tokens on their own is wrong for two common tokenizer families:

- Metaspace / SentencePiece decoders (Llama 2, Mistral, TinyStories' llama2.c models) drop the leading space
  of the *first* token they decode, so ``decode([▁go])`` is ``"go"`` and "Lily wanted to" + "go" prints
  "Lily wanted togo".
- Byte-level BPE (GPT-2, Llama 3, Qwen) splits a multi-byte UTF-8 character over several tokens; decoding
  only part of it gives U+FFFD.

:class:`IncrementalDetokenizer` decodes the new tokens *behind a few tokens of context* (the prompt's last
tokens, later the last emitted ones) and emits only the difference against the context's own text, holding
back text that ends in an incomplete character until a later token completes it. Each ``push`` decodes a
bounded window, so it suits streaming (``EagleEngine.stream``) and a server as well as a finished result.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of the tokens generated after ``prompt_ids``, emitted piece by piece.

    >>> detok = IncrementalDetokenizer(tokenizer, prompt_ids)  # doctest: +SKIP
    >>> for ids in engine.stream(prompt_ids, 64):  # doctest: +SKIP
    ...     print(detok.push(ids), end="", flush=True)
    >>> print(detok.flush())  # doctest: +SKIP

    ``"".join`` of every ``push`` and the final ``flush`` equals the text decoding prompt + all new tokens
    gives after the prompt's own text. ``context``: prompt tokens kept as context (a handful suffices: the
    leading-space rule and incomplete characters reach back one token or a few bytes).
    """

    def __init__(self, tokenizer, prompt_ids, skip_special_tokens: bool = True, context: int = 6):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context = max(1, int(context))
        self._ids = [int(i) for i in list(prompt_ids)[-self.context :]]
        self._start = len(self._ids)  # tokens before this index are context, already emitted or the prompt
        self._base = self._decode(self._ids)  # the context's own text
        self._emitted = 0  # characters of the text after the base already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> str:
        """Text of the tokens after the context that has not been emitted yet (may end incomplete)."""
        full = self._decode(self._ids)
        if full.startswith(self._base):
            return full[len(self._base) + self._emitted :]
        # A decoder that rewrites across the boundary: keep what is shared, never emit text twice.
        shared = 0
        for a, b in zip(full, self._base):
            if a != b:
                break
            shared += 1
        return full[max(shared, len(self._base) + self._emitted) :]

    def push(self, new_ids) -> str:
        """Add new token ids; return the newly completed text (possibly ``""``)."""
        self._ids.extend(int(i) for i in new_ids)
        pending = self._pending()
        ready = pending.rstrip(REPLACEMENT)  # an incomplete UTF-8 sequence waits for its next bytes
        self._emitted += len(ready)
        if len(ready) == len(pending):
            self._reanchor()
        return ready

    def flush(self) -> str:
        """The rest, held-back incomplete characters included (as U+FFFD): call once at the end."""
        rest = self._pending()
        self._emitted += len(rest)
        self._reanchor()
        return rest

    def _reanchor(self) -> None:
        """Everything is emitted: keep only the last few tokens as context, so decoding stays cheap."""
        if len(self._ids) - self._start <= 2 * self.context:
            return
        self._ids = self._ids[-self.context :]
        self._start = len(self._ids)
        self._base = self._decode(self._ids)
        self._emitted = 0


def decode_new(tokenizer, prompt_ids, new_ids, skip_special_tokens: bool = True) -> str:
    """The text ``new_ids`` add after ``prompt_ids`` (one-shot use of :class:`IncrementalDetokenizer`)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return detok.push(new_ids) + detok.flush()
