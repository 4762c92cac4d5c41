"""The regeneration of ``eagle prepare-data --regenerate``: the engine rewrites every assistant turn of every
conversation, turn by turn (the job, its checks, its output file and its resume are :mod:`.prepare_data`'s).

- The prompt of assistant turn ``k`` is the chat template's rendering of ``messages[:k]`` with the
  generation prompt (``add_generation_prompt=True``), the earlier assistant turns already rewritten, tokenized
  with ``add_special_tokens=False`` (the template writes its own BOS where it wants one). System and user
  turns are copied unchanged; assistant turns before the first user turn have no question to answer and are
  dropped (counted).
- Generation stops at the engine's default stop ids (the model's eos ids), the tokenizer's ``eos_token_id``
  and the template's end-of-turn token (:func:`end_of_turn_id`: the special token the template writes right
  after an assistant message, e.g. ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``; none when the template
  ends a turn with plain text). The stop token itself is not part of the new content: the template writes it
  again when the conversation is rendered for training.
- The new content is the text the generated tokens add after the prompt
  (:func:`~.detokenize.decode_new`, special tokens skipped).
- The conversations of a batch generate their ``k``-th assistant turn together (one engine call). A turn whose
  prompt leaves fewer than ``max_new_tokens`` below the engine's maximum length ends its conversation there:
  it is kept up to its last rewritten assistant turn when it has one, else skipped; either way counted.
- Sampling with a seed gives every turn its own seed, derived from the seed, the conversation's id and the
  turn's index, so the output depends neither on the batch size nor on where a run was resumed.

The settings (``job``) are any object with the attributes of :class:`~.prepare_data.PrepareDataJob` used
here: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed`` (:class:`Regenerator`), and for
:func:`regenerate` also ``base``, ``draft``, ``engine_kwargs``, ``device``, ``dtype``, ``batch_size``,
``show_progress``.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .conversations import Conversation

PROBE = "PREPARE_DATA_PROBE"  # an assistant message no template rewrites, to find what follows one


# --------------------------------------------------------------------------------------- the template


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the special token the chat template writes right after an assistant message (whitespace
    between them allowed), or None: the template ends a turn with plain text, or cannot render the probe.
    Of several special tokens the text could start with, the longest wins (``<|end|>`` vs ``<|end|>x``)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template may reject anything (jinja's raise_exception): then there is no answer
        return None
    at = text.rfind(PROBE)
    if at < 0:
        return None
    rest = text[at + len(PROBE) :].lstrip()
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {str(t): i for i, t in decoder.items() if getattr(t, "special", False)}
    found = [t for t in specials if t and rest.startswith(t)]
    return specials[max(found, key=len)] if found else None


def stop_ids(tokenizer, eos_token_ids, vocab_size: int) -> list[int]:
    """The ids that end an assistant turn: the model's eos ids (the engine's default), the tokenizer's
    ``eos_token_id`` and the template's end-of-turn token, those inside the model's vocabulary."""
    ids = list(eos_token_ids)
    for extra in (getattr(tokenizer, "eos_token_id", None), end_of_turn_id(tokenizer)):
        if isinstance(extra, int) and extra not in ids:
            ids.append(extra)
    return [i for i in ids if 0 <= i < vocab_size]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens of ``messages`` rendered with the generation prompt (the template writes any BOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def turn_seed(seed: int, conversation_id: str, turn: int) -> int:
    """A seed in ``[0, 2**63)`` for one assistant turn: the same whatever batch or run the turn is in."""
    digest = hashlib.sha256(f"{seed}\0{conversation_id}\0{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------- regeneration


@dataclass
class _Rewrite:
    """One conversation being rewritten: ``messages`` is the output so far; ``next`` indexes the original
    message to take next; ``stopped``: why it ended early (None: it has not)."""

    source: Conversation
    messages: list[dict] = field(default_factory=list)
    next: int = 0
    turns: int = 0
    stopped: str | None = None

    def advance(self, counts: Counter) -> bool:
        """Copy the system and user turns up to the next assistant turn; True when one is waiting."""
        original = self.source.messages
        while self.next < len(original):
            message = original[self.next]
            if message["role"] != "assistant":
                self.messages.append(dict(message))
            elif any(m["role"] == "user" for m in self.messages):
                return True
            else:
                counts["assistant turns before any user turn, dropped"] += 1
            self.next += 1
        return False

    def result(self) -> Conversation | None:
        """The rewritten conversation (cut after its last rewritten turn if it stopped early), or None."""
        if not self.turns:
            return None
        messages = self.messages
        if self.stopped is not None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages = messages[: last + 1]
        return Conversation(messages, self.source.id)


class Regenerator:
    """Rewrites the assistant turns of conversations with ``engine`` (see the module docstring)."""

    def __init__(self, engine, tokenizer, job):
        self.engine = engine
        self.tokenizer = tokenizer
        self.job = job
        cfg = engine.target.config
        self.stop_ids = stop_ids(tokenizer, cfg.eos_token_ids, cfg.vocab_size)
        self.generate = engine.generate if engine.method is not None else engine.generate_vanilla
        self.seed = job.seed
        if self.seed is None and job.temperature > 0:
            # The engine gives a batch without seeds one shared seed: its turns would sample from the same
            # random numbers. A base seed drawn here still gives every turn a seed of its own.
            self.seed = random.SystemRandom().randrange(2**63)
        self.counts = Counter()  # per conversation: how it ended; per turn: dropped, cut at the budget
        self.tokens = 0
        self.turns = 0
        self.generation_seconds = 0.0

    def _prompt(self, item: _Rewrite) -> list[int] | None:
        """The prompt of ``item``'s waiting turn; None (and ``item.stopped`` says why) when it has none."""
        from jinja2.exceptions import TemplateError

        try:
            ids = prompt_ids(self.tokenizer, item.messages)
        except TemplateError as e:
            item.stopped = f"the chat template refused it ({e})"
            return None
        room = self.engine.max_length - self.job.max_new_tokens
        if not ids:
            item.stopped = "the chat template rendered an empty prompt"
        elif len(ids) > room:
            item.stopped = (
                f"a prompt longer than {room} tokens (the engine's maximum length "
                f"{self.engine.max_length} - --max-new-tokens)"
            )
        return None if item.stopped else ids

    def _seeds(self, items: list[_Rewrite]) -> list[int] | None:
        if self.seed is None:
            return None  # greedy
        return [turn_seed(self.seed, item.source.id, item.turns) for item in items]

    def batch(self, conversations: list[Conversation]) -> list[Conversation]:
        """Rewrite ``conversations`` together, turn by turn; the conversations to write, in input order."""
        from .detokenize import decode_new

        items = [_Rewrite(c) for c in conversations]
        waiting = [item for item in items if item.advance(self.counts)]
        while waiting:
            ready, prompts = [], []
            for item in waiting:
                ids = self._prompt(item)
                if ids is not None:
                    ready.append(item)
                    prompts.append(ids)
            if not ready:
                break
            job = self.job
            start = time.perf_counter()
            results = self.generate(
                prompts,
                job.max_new_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                top_k=job.top_k,
                seed=self._seeds(ready),
                stop_token_ids=self.stop_ids,
            )
            self.generation_seconds += time.perf_counter() - start
            for item, ids, result in zip(ready, prompts, results):
                new = list(result.tokens)
                self.tokens += len(new)
                if result.stop_reason == "stop_token" and new and new[-1] in self.stop_ids:
                    new = new[:-1]  # the template writes its own end of turn when rendering for training
                elif result.stop_reason == "max_new_tokens":
                    self.counts["assistant turns cut at --max-new-tokens"] += 1
                if not new:
                    self.counts["assistant turns left empty (the target ended the turn at once)"] += 1
                item.messages.append({"role": "assistant", "content": decode_new(self.tokenizer, ids, new)})
                item.turns += 1
                item.next += 1
            self.turns += len(ready)
            waiting = [item for item in ready if item.advance(self.counts)]
        written = []
        for item in items:
            out = item.result()
            if item.stopped is not None:
                self.counts[("cut before a turn: " if out else "skipped: ") + item.stopped] += 1
            elif out is None:
                self.counts["skipped: no assistant turn after a user turn"] += 1
            else:
                self.counts["regenerated whole"] += 1
            if out is not None:
                written.append(out)
        return written


def regenerate(
    job,
    tokenizer,
    conversations: list[Conversation],
    write: Callable[[list[Conversation]], None],
    say: Callable[[str], None] = lambda text: None,
) -> dict:
    """Build the engine of ``job`` and rewrite ``conversations`` in batches of ``job.batch_size``, handing
    each batch's rewrites to ``write`` (in input order) before the next batch starts; a progress bar on
    stderr when ``job.show_progress``. Returns ``written``, ``turns``, ``tokens``, ``outcomes`` (what
    became of the conversations and turns, counted), ``generation_seconds``, ``stop_token_ids`` and
    ``method``."""
    from tqdm import tqdm

    from ..engine.engine import EagleEngine

    engine = EagleEngine.from_pretrained(
        job.base,
        job.draft,
        device=job.device,
        dtype=job.dtype,
        threads=0,  # the command set them (set_threads), as eagle generate does
        max_batch_size=job.batch_size,
        **job.engine_kwargs,
    )
    regen = Regenerator(engine, tokenizer, job)
    say(
        f"{len(conversations)} conversation(s) to regenerate with {engine.method or 'vanilla decoding'}, "
        f"stopping at token ids {regen.stop_ids}"
    )
    written = 0
    bar = tqdm(
        total=len(conversations),
        desc="prepare-data",
        unit="conv",
        file=sys.stderr,
        disable=not job.show_progress,
        mininterval=2,
    )
    try:
        for start in range(0, len(conversations), job.batch_size):
            chunk = conversations[start : start + job.batch_size]
            rewritten = regen.batch(chunk)
            write(rewritten)
            written += len(rewritten)
            bar.update(len(chunk))
            rate = regen.tokens / regen.generation_seconds if regen.generation_seconds else 0.0
            bar.set_postfix(tokens=regen.tokens, tok_s=f"{rate:.1f}", refresh=False)
    finally:
        bar.close()
        engine.close()
    return {
        "written": written,
        "turns": regen.turns,
        "tokens": regen.tokens,
        "outcomes": dict(regen.counts),
        "generation_seconds": regen.generation_seconds,
        "stop_token_ids": regen.stop_ids,
        "method": engine.method or "vanilla",
    }
