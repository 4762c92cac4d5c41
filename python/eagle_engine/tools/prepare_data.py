"""``eagle prepare-data``: chat data for draft training, its assistant turns optionally rewritten by the
target, and the frequencies of the tokens training will see.

A draft head learns to predict its target; trained on the target's own answers rather than on whatever wrote
the dataset (often another model), it agrees with the target more often. With ``regenerate`` the engine
rewrites every assistant turn of every conversation, turn by turn:

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

The output is ``messages`` JSONL (:func:`~.conversations.conversation_record`, the input's ids), appended
after each batch, flushed and fsynced, so an interrupted run loses at most the batch in flight: a new run
with the same ``out`` skips the ids already there (and drops an incomplete last line). Without
``regenerate`` the conversations are only rewritten as ``messages`` JSONL (format conversion, no engine).

``token_frequencies``: the counts of the tokens the training loss covers (:func:`~.training_data.read_rows`
over the output, or over text data, then :func:`~.training_data.token_frequencies`), saved by
:func:`~.training_data.save_frequencies`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from ..errors import EagleError, TrainingInputError
from .checks import check_number
from .conversations import Conversation, conversation_record

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 256  # train-draft's default: count the tokens of the rows it will train on
PROBE = "PREPARE_DATA_PROBE"  # an assistant message no template rewrites, to find what follows one
# Flags that only mean something with --regenerate (a None default in the parser tells "not given").
REGENERATE_FLAGS = (
    "draft",
    "method",
    "method_settings",
    "tree",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "batch_size",
)


@dataclass
class PrepareDataJob:
    """What ``eagle prepare-data`` does (the fields are its flags; see the module docstring).

    ``engine_kwargs``: the method keywords of :meth:`EagleEngine.from_pretrained` (``method``, ``tree``,
    a method's settings), as :func:`~.model_args.method_kwargs` builds them from the flags."""

    base: str
    data: list[str]
    out: str | None = None
    data_format: str | None = None
    chat_template: str | None = None
    regenerate: bool = False
    draft: str | None = None
    engine_kwargs: dict = field(default_factory=dict)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    token_frequencies: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    device: str = "cpu"
    dtype: str = "float32"
    show_progress: bool = True


def job_from_args(args) -> PrepareDataJob:
    """The job of the parsed ``eagle prepare-data`` flags; a regeneration flag without ``--regenerate`` and
    ``--seq-len`` without ``--token-frequencies`` are errors (never silently ignored)."""
    from .model_args import method_kwargs

    if args.base is None:
        raise TrainingInputError("eagle prepare-data needs --base: the target model directory")
    if not args.regenerate:
        given = [name for name in REGENERATE_FLAGS if getattr(args, name) is not None]
        if given:
            raise TrainingInputError(f"--{given[0].replace('_', '-')} is for --regenerate")
    if args.seq_len is not None and args.token_frequencies is None:
        raise TrainingInputError("--seq-len is for --token-frequencies (the rows whose tokens are counted)")
    defaults = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "batch_size": DEFAULT_BATCH_SIZE,
        "seq_len": DEFAULT_SEQ_LEN,
    }
    value = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in defaults.items()
    }
    return PrepareDataJob(
        base=args.base,
        data=list(args.data),
        out=args.out,
        data_format=args.data_format,
        chat_template=args.chat_template,
        regenerate=args.regenerate,
        draft=args.draft,
        engine_kwargs=method_kwargs(args) if args.regenerate else {},
        seed=args.seed,
        limit=args.limit,
        token_frequencies=args.token_frequencies,
        device=args.device,
        dtype=args.dtype,
        **value,
    )


# ------------------------------------------------------------------------------------------- checks


def _check_writable_file(path: str, flag: str) -> None:
    """``path`` can be created or appended to: its directory is created and written to (a probe file)."""
    if os.path.isdir(path):
        raise TrainingInputError(f"{flag} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".eagle-write-test"):
            pass
    except OSError as e:
        raise TrainingInputError(f"{flag} {path}: its directory is not writable: {e.strerror or e}") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise TrainingInputError(f"{flag} {path} exists and is not writable")


def check_job(job: PrepareDataJob):
    """Every check that needs no model, tokenizer or engine loaded; returns ``(data format, model config)``.
    Failures are :class:`TrainingInputError` naming the flag."""
    from ..engine.engine import DEFAULT_MAX_MODEL_LEN, resolve_device
    from ..models.weights import resolve_dtype
    from ..speculative.sampling import SamplingParams
    from .common import check_model_dir
    from .conversations import DATA_FORMATS, detect_format
    from .corpus import corpus_files

    config = check_model_dir(job.base)
    files = corpus_files(job.data, "--data")
    if job.data_format is not None and job.data_format not in DATA_FORMATS:
        raise TrainingInputError(f"--data-format {job.data_format!r}: use one of {', '.join(DATA_FORMATS)}")
    fmt = job.data_format or detect_format(job.data, "--data")
    if job.chat_template is not None and not os.path.isfile(job.chat_template):
        raise TrainingInputError(f"--chat-template: file not found: {job.chat_template}")
    if fmt == "text":
        for flag, given in (
            ("--regenerate", job.regenerate),
            ("--out", job.out is not None),
            ("--chat-template", job.chat_template is not None),
        ):
            if given:
                raise TrainingInputError(
                    f"{flag} is for conversation data (sharegpt, messages); --data is text, of which only "
                    "--token-frequencies can be made"
                )
        if job.token_frequencies is None:
            raise TrainingInputError(
                "--data is text: give --token-frequencies FILE (the only output for text)"
            )
    elif job.out is None:
        raise TrainingInputError("--out FILE.jsonl is needed: where the conversations are written")
    if job.limit is not None:
        check_number("limit", job.limit, "int", low=1)
    check_number("seq_len", job.seq_len, "int", low=2)
    if job.token_frequencies is not None and job.seq_len > config.max_length:
        raise TrainingInputError(
            f"--seq-len {job.seq_len} exceeds the model's maximum length {config.max_length}"
        )
    data_files = {os.path.realpath(f) for f in files}
    outputs = [("--out", job.out), ("--token-frequencies", job.token_frequencies)]
    for flag, path in outputs:
        if path is None:
            continue
        if os.path.realpath(path) in data_files:
            raise TrainingInputError(f"{flag} {path} is one of the --data files; write elsewhere")
        _check_writable_file(path, flag)
    if job.out is not None and job.token_frequencies is not None:
        if os.path.realpath(job.out) == os.path.realpath(job.token_frequencies):
            raise TrainingInputError("--token-frequencies must be another file than --out")
    if job.out is not None and not job.regenerate and os.path.isfile(job.out) and os.path.getsize(job.out):
        # Converting is cheap, regenerating is not: never replace a file that may hold a regeneration.
        raise TrainingInputError(
            f"--out {job.out} exists; without --regenerate it would be replaced: remove it or give another "
            "file (with --regenerate, an existing --out is resumed)"
        )
    if job.regenerate:
        check_number("max_new_tokens", job.max_new_tokens, "int", low=1)
        check_number("batch_size", job.batch_size, "int", low=1)
        try:
            SamplingParams(job.temperature, job.top_p, job.top_k)
        except EagleError as e:
            raise TrainingInputError(f"--temperature/--top-p/--top-k: {e}") from None
        max_length = min(config.max_length, DEFAULT_MAX_MODEL_LEN)
        if job.max_new_tokens >= max_length:
            raise TrainingInputError(
                f"--max-new-tokens {job.max_new_tokens} leaves no room for a prompt: the engine's maximum "
                f"length (prompt + new tokens) is {max_length}"
            )
        if job.draft is not None and not os.path.isdir(job.draft):
            raise TrainingInputError(f"--draft: directory not found: {job.draft}")
        resolve_device(job.device)
        resolve_dtype(job.dtype)
    return fmt, config


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


# --------------------------------------------------------------------------------------------- output


def read_done(path: str) -> tuple[set[str], int, bool]:
    """The ids already in the output ``path`` (absent: none), its record count, and whether an incomplete
    last line (a write cut short) was dropped from it. A complete line that is not a record is an error."""
    if not os.path.isfile(path):
        return set(), 0, False
    with open(path, "rb") as f:
        raw = f.read()
    repaired = bool(raw) and not raw.endswith(b"\n")
    if repaired:
        raw = raw[: raw.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(raw))
    ids = set()
    lines = 0
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rid = record["id"]
            if not isinstance(rid, str) or not isinstance(record["messages"], list):
                raise TypeError("'id' must be a string and 'messages' a list")
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingInputError(
                f"--out {path}:{n} is not a prepare-data record ({e}); give another --out to start afresh"
            ) from None
        ids.add(rid)
        lines += 1
    return ids, lines, repaired


def count_records(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


class _Appender:
    """Appends records to the output, each batch flushed and fsynced; holds an exclusive lock on the file
    so that a second run on the same output fails instead of interleaving lines."""

    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            self.file.close()
            raise TrainingInputError(
                f"--out {path} is locked: another eagle prepare-data is writing it"
            ) from None

    def write(self, conversations: list[Conversation]) -> None:
        for c in conversations:
            self.file.write(json.dumps(conversation_record(c), ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


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

    def __init__(self, engine, tokenizer, job: PrepareDataJob):
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


def _say(job: PrepareDataJob, text: str) -> None:
    if job.show_progress:
        print(f"prepare-data: {text}", file=sys.stderr)


def regenerate_file(job: PrepareDataJob, tokenizer, conversations: list[Conversation]) -> dict:
    """Append the rewrites of ``conversations`` not yet in ``job.out`` to it; returns the summary."""
    started = time.perf_counter()
    appender = _Appender(job.out)  # locked before it is read or the engine loads: one run per output
    try:
        summary = _regenerate_into(appender, job, tokenizer, conversations)
    finally:
        appender.close()
    records = count_records(job.out)
    if records != summary["records_before"] + summary["written"]:
        raise EagleError(
            f"--out {job.out} holds {records} records; {summary['records_before']} were there and "
            f"{summary['written']} were written: was it changed by another process meanwhile?"
        )
    summary.update(records=records, seconds=time.perf_counter() - started)
    return summary


def _regenerate_into(appender: _Appender, job: PrepareDataJob, tokenizer, conversations) -> dict:
    from tqdm import tqdm

    from ..engine.engine import EagleEngine

    done, before, repaired = read_done(job.out)
    if repaired:
        _say(job, f"dropped an incomplete last line of {job.out} (a write cut short)")
    todo = [c for c in conversations if c.id not in done]
    if done:
        _say(
            job,
            f"resuming: {len(conversations) - len(todo)} conversation(s) already in {job.out} are skipped",
        )
    summary = {"already_in_out": len(conversations) - len(todo), "records_before": before, "written": 0}
    summary.update(turns=0, tokens=0, outcomes={}, generation_seconds=0.0)
    if not todo:
        return summary
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
    _say(
        job,
        f"{len(todo)} conversation(s) to regenerate with {engine.method or 'vanilla decoding'}, "
        f"stopping at token ids {regen.stop_ids}",
    )
    bar = tqdm(
        total=len(todo),
        desc="prepare-data",
        unit="conv",
        file=sys.stderr,
        disable=not job.show_progress,
        mininterval=2,
    )
    try:
        for start in range(0, len(todo), job.batch_size):
            chunk = todo[start : start + job.batch_size]
            written = regen.batch(chunk)
            appender.write(written)
            summary["written"] += len(written)
            bar.update(len(chunk))
            rate = regen.tokens / regen.generation_seconds if regen.generation_seconds else 0.0
            bar.set_postfix(tokens=regen.tokens, tok_s=f"{rate:.1f}", refresh=False)
    finally:
        bar.close()
        engine.close()
    summary.update(
        turns=regen.turns,
        tokens=regen.tokens,
        outcomes=dict(regen.counts),
        generation_seconds=regen.generation_seconds,
        stop_token_ids=regen.stop_ids,
        method=engine.method or "vanilla",
    )
    return summary


# ------------------------------------------------------------------------------------------- the job


def _unique(conversations: list[Conversation]) -> tuple[list[Conversation], int]:
    """The first conversation of each id (resuming goes by id, so an id must name one conversation)."""
    seen, kept = set(), []
    for c in conversations:
        if c.id not in seen:
            seen.add(c.id)
            kept.append(c)
    return kept, len(conversations) - len(kept)


def write_frequencies(job: PrepareDataJob, tokenizer, fmt: str, vocab_size: int) -> dict:
    """Count the trained tokens of the output (conversations) or of ``job.data`` (text) and save them."""
    from ..models.vocab import save_frequencies
    from .training_data import read_rows, token_frequencies

    paths, data_format = ([job.out], "messages") if fmt != "text" else (job.data, "text")
    rows = read_rows(
        tokenizer,
        paths,
        job.seq_len,
        data_format=data_format,
        chat_template=job.chat_template if fmt != "text" else None,
        model_dir=job.base,
        flag_name="--out" if fmt != "text" else "--data",
    )
    counts = token_frequencies(rows, vocab_size)
    source = {
        "data": paths,
        "format": data_format,
        "seq_len": job.seq_len,
        "chat_template": job.chat_template,
        "regenerated": job.regenerate,
        "rows": len(rows),
        "read": rows.report,
    }
    tmp = job.token_frequencies + ".tmp"
    save_frequencies(tmp, counts, source)
    os.replace(tmp, job.token_frequencies)  # a partial file never has the name
    return {"path": job.token_frequencies, "total": int(counts.sum()), "distinct": int((counts > 0).sum())}


def run_prepare_data(job: PrepareDataJob) -> dict:
    """The ``eagle prepare-data`` workflow; returns the summary :func:`describe` prints. Everything that can
    be checked is checked (:func:`check_job`) before the tokenizer, and the engine, load."""
    from .chat_template import apply_template_file
    from .common import load_tokenizer
    from .conversations import read_conversations, write_conversations

    fmt, config = check_job(job)
    summary = {"format": fmt}
    found = None
    if fmt != "text":
        found = read_conversations(job.data, fmt, "--data")
        summary["read"] = found.describe()
    tokenizer = load_tokenizer(job.base)
    if found is not None:
        apply_template_file(tokenizer, job.chat_template, job.base)
        conversations, duplicates = _unique(found.conversations)
        if duplicates:
            summary["duplicate_ids"] = duplicates
            _say(job, f"{duplicates} conversation(s) repeat an earlier id and are left out")
        if job.limit is not None:
            conversations = conversations[: job.limit]
        summary["conversations"] = len(conversations)
        if job.regenerate:
            summary.update(regenerate_file(job, tokenizer, conversations))
        else:
            write_conversations(job.out, conversations)
            summary["written"] = summary["records"] = len(conversations)
        summary["out"] = job.out
    if job.token_frequencies is not None:
        summary["token_frequencies"] = write_frequencies(job, tokenizer, fmt, config.vocab_size)
    return summary


def describe(summary: dict) -> list[str]:
    """The summary's lines, as ``eagle prepare-data`` prints them."""
    lines = []
    if "read" in summary:
        lines.append(f"read: {summary['read']}")
    if "out" in summary:
        if "outcomes" in summary:
            lines.append(
                f"{summary['conversations']} conversation(s): {summary['already_in_out']} already in "
                f"{summary['out']}, {summary['written']} regenerated and written"
            )
            for what, n in sorted(summary["outcomes"].items()):
                lines.append(f"  {n} {what}")
            seconds, gen = summary["seconds"], summary["generation_seconds"]
            rate = f"{summary['tokens'] / gen:.1f}" if gen else "-"
            lines.append(
                f"{summary['turns']} assistant turn(s), {summary['tokens']} tokens generated in "
                f"{gen:.1f} s ({rate} tokens/s); {seconds:.1f} s in all"
            )
        else:
            lines.append(
                f"{summary['written']} conversation(s) written to {summary['out']} (messages format)"
            )
        lines.append(f"{summary['out']}: {summary['records']} conversation(s)")
    if "token_frequencies" in summary:
        freq = summary["token_frequencies"]
        lines.append(
            f"token frequencies: {freq['total']} trained tokens, {freq['distinct']} distinct, "
            f"written to {freq['path']}"
        )
    return lines
