"""``eagle prepare-data``: chat data for draft training, its assistant turns optionally rewritten by the
target, and the frequencies of the tokens training will see. Here: the job, its checks, the output file
(append, resume, lock, the regeneration's settings), the token frequencies and the summary; the regeneration
itself (the engine loop, prompts, stop ids, per-turn seeds) is :mod:`.regenerate`'s.

A draft head learns to predict its target; trained on the target's own answers rather than on whatever wrote
the dataset (often another model), it agrees with the target more often. With ``regenerate`` the engine
rewrites every assistant turn of every conversation (:mod:`.regenerate`); without it the conversations are
only rewritten as ``messages`` JSONL (format conversion: no engine, no tokenizer, no template).

Ids: the output's records (:func:`~.conversations.conversation_record`) keep the input's ids; a record without
one gets :func:`content_id` of its messages (the hash of their canonical JSON), the same whatever the spelling
of its ``--data`` path or its place in the file.

Regeneration output: appended after each batch, flushed and fsynced, so an interrupted run loses at most the
batch in flight; a new run with the same ``out`` skips the ids already there (and drops an incomplete last
line). The settings that decide the regenerated text (:func:`regeneration_settings`: target, draft, method,
tree, method settings, chat template, sampling, ``max_new_tokens``) are written to :func:`manifest_path`
(``OUT.prepare.json``) before the first record; a run continues only an ``out`` that has one, with the same
settings (:func:`check_resume`): an ``out`` without one (a conversion, another program's file) or one made
with other settings is refused, naming the flags that differ.

``token_frequencies``: the counts of the tokens the training loss covers (:func:`~.training_data.read_rows`
over the output, or over text data, then :func:`~.training_data.token_frequencies`), saved by
:func:`~.training_data.save_frequencies`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import EagleError, TrainingInputError
from .checks import check_number
from .conversations import Conversation, conversation_record

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 256  # train-draft's default: count the tokens of the rows it will train on
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
MANIFEST_SUFFIX = ".prepare.json"
MANIFEST_WRITER = "eagle prepare-data --regenerate"
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
    "device",
    "dtype",
    "threads",
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
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    show_progress: bool = True


def job_from_args(args) -> PrepareDataJob:
    """The job of the parsed ``eagle prepare-data`` flags. A flag that would change nothing is an error
    naming it (never silently ignored): an engine, sampling or batch flag without ``--regenerate``,
    ``--chat-template`` with neither ``--regenerate`` nor ``--token-frequencies``, ``--seq-len`` without
    ``--token-frequencies`` (and, in :func:`check_job`, ``--limit`` with text data)."""
    from .model_args import method_kwargs

    if args.base is None:
        raise TrainingInputError("eagle prepare-data needs --base: the target model directory")
    if not args.regenerate:
        given = [name for name in REGENERATE_FLAGS if getattr(args, name, None) is not None]
        if given:
            raise TrainingInputError(f"--{given[0].replace('_', '-')} is for --regenerate")
        if args.chat_template is not None and args.token_frequencies is None:
            raise TrainingInputError(
                "--chat-template is for --regenerate or --token-frequencies: a conversion alone copies the "
                "messages as they are, rendering nothing"
            )
    if args.seq_len is not None and args.token_frequencies is None:
        raise TrainingInputError("--seq-len is for --token-frequencies (the rows whose tokens are counted)")
    defaults = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "batch_size": DEFAULT_BATCH_SIZE,
        "seq_len": DEFAULT_SEQ_LEN,
        "device": DEFAULT_DEVICE,
        "dtype": DEFAULT_DTYPE,
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
            ("--limit", job.limit is not None),
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
    if job.out is not None:
        manifest = manifest_path(job.out)
        if os.path.isdir(manifest):
            raise TrainingInputError(f"--out {job.out}: {manifest} (its settings file) is a directory")
        for flag, path in [("--data", f) for f in files] + [("--token-frequencies", job.token_frequencies)]:
            if path is not None and os.path.realpath(path) == os.path.realpath(manifest):
                raise TrainingInputError(
                    f"{flag} {path} is where --regenerate keeps the settings of --out {job.out}; "
                    "give another file"
                )
    if job.out is not None and not job.regenerate and os.path.isfile(job.out) and os.path.getsize(job.out):
        # Converting is cheap, regenerating is not: never replace a file that may hold a regeneration.
        raise TrainingInputError(
            f"--out {job.out} exists; without --regenerate it would be replaced: remove it or give another "
            "file (with --regenerate, an --out that --regenerate wrote is continued)"
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
        check_resume(job, regeneration_settings(job))  # again under the output's lock, before a write
    return fmt, config


# ------------------------------------------------------------------------------------------------ ids


def content_id(messages: list[dict]) -> str:
    """The id of a conversation without one: the sha1 of its messages' canonical JSON (keys sorted, no
    spaces, UTF-8), 16 hex digits. The same messages give the same id, whatever file they were read from."""
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def with_stable_ids(conversations: list[Conversation], files: list[str]) -> list[Conversation]:
    """``conversations`` with the id :func:`~.conversations.read_conversations` made up for a record without
    one (``"<path as typed>:<index>"``, ``path`` one of ``files``) replaced by :func:`content_id`: resuming
    goes by id, and that one changes with the spelling of the path."""
    paths = set(files)
    stable = []
    for c in conversations:
        path, colon, index = c.id.rpartition(":")
        made_up = colon and index.isdigit() and path in paths
        stable.append(Conversation(c.messages, content_id(c.messages)) if made_up else c)
    return stable


# ---------------------------------------------------------------------------------------- the manifest


def manifest_path(out: str) -> str:
    """Where ``--regenerate`` keeps the settings of ``out``: ``OUT.prepare.json`` beside it."""
    return out + MANIFEST_SUFFIX


def _file_sha1(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def regeneration_settings(job: PrepareDataJob) -> dict:
    """The settings that decide the regenerated text, by flag (JSON values): the target and draft directories
    (real paths), the method, tree and method settings, the chat template (the sha1 of ``--chat-template``'s
    file; None: the tokenizer's own), ``--max-new-tokens`` and the sampling settings. The batch size, the
    device and the dtype are not among them: a run may continue on another machine."""
    kwargs = dict(job.engine_kwargs)
    method, tree = kwargs.pop("method", None), kwargs.pop("tree", None)
    settings = {
        "--base": os.path.realpath(job.base),
        "--draft": None if job.draft is None else os.path.realpath(job.draft),
        "--method": method,
        "--tree": tree,
        "--method-settings": kwargs or None,
        "--chat-template": None if job.chat_template is None else _file_sha1(job.chat_template),
        "--max-new-tokens": job.max_new_tokens,
        "--temperature": float(job.temperature),
        "--top-p": float(job.top_p),
        "--top-k": int(job.top_k),
        "--seed": job.seed,
    }
    return json.loads(json.dumps(settings, default=repr))  # as the manifest will read them back


def _shown(flag: str, value) -> str:
    if flag == "--chat-template":
        return "the tokenizer's own" if value is None else f"the file of sha1 {value[:12]}"
    return "none" if value is None else repr(value)


def check_resume(job: PrepareDataJob, settings: dict) -> bool:
    """Whether ``job.out`` holds records to continue (False: absent or empty, a run starts afresh). Records
    are continued only when :func:`manifest_path` says that ``--regenerate`` wrote them, with ``settings``;
    otherwise a :class:`TrainingInputError` says why, naming the flags that differ. Reads only."""
    if not (os.path.isfile(job.out) and os.path.getsize(job.out) > 0):
        return False
    manifest = manifest_path(job.out)
    if not os.path.isfile(manifest):
        raise TrainingInputError(
            f"--out {job.out} was not written by --regenerate (there is no {manifest} beside it): it may "
            "hold the input's or another model's answers; give another --out, or remove it, to regenerate"
        )
    try:
        with open(manifest, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("written_by") != MANIFEST_WRITER or not isinstance(saved.get("settings"), dict):
            raise ValueError("not written by eagle prepare-data --regenerate")
    except (OSError, ValueError, AttributeError) as e:
        raise TrainingInputError(
            f"--out {job.out}: {manifest} is not a settings file of --regenerate ({e}); give another --out"
        ) from None
    earlier = saved["settings"]
    flags = [*settings, *(flag for flag in earlier if flag not in settings)]
    differ = [flag for flag in flags if earlier.get(flag) != settings.get(flag)]
    if differ:
        changes = ", ".join(
            f"{flag} ({_shown(flag, earlier.get(flag))} then, {_shown(flag, settings.get(flag))} now)"
            for flag in differ
        )
        raise TrainingInputError(
            f"--out {job.out} was regenerated with other settings (see {manifest}): {changes}; give the same "
            "flags to continue it, or another --out"
        )
    return True


def write_manifest(path: str, settings: dict) -> None:
    """Write the settings file atomically, flushed and fsynced (before the first record is)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"written_by": MANIFEST_WRITER, "settings": settings}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    from .regenerate import regenerate

    settings = regeneration_settings(job)
    if not check_resume(job, settings):  # checked again now that no other run can write the file
        write_manifest(manifest_path(job.out), settings)
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
    if todo:
        summary.update(regenerate(job, tokenizer, todo, appender.write, lambda text: _say(job, text)))
    return summary


# ------------------------------------------------------------------------------------------- the job


def _unique(conversations: list[Conversation]) -> tuple[list[Conversation], int]:
    """The first conversation of each id (resuming goes by id, so an id must name one conversation; without
    an id of their own, conversations of the same messages have the same one)."""
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
    be checked is checked (:func:`check_job`) before the tokenizer, and the engine, load; a conversion alone
    loads neither."""
    from .chat_template import apply_template_file
    from .common import load_tokenizer
    from .conversations import read_conversations, write_conversations
    from .corpus import corpus_files

    fmt, config = check_job(job)
    summary = {"format": fmt}
    tokenizer = None
    if fmt != "text":
        found = read_conversations(job.data, fmt, "--data")
        summary["read"] = found.describe()
        conversations = with_stable_ids(found.conversations, corpus_files(job.data, "--data"))
        conversations, duplicates = _unique(conversations)
        if duplicates:
            summary["duplicate_ids"] = duplicates
            _say(
                job,
                f"{duplicates} conversation(s) repeat an earlier id (without an id: an earlier "
                "conversation's messages) and are left out",
            )
        if job.limit is not None:
            conversations = conversations[: job.limit]
        summary["conversations"] = len(conversations)
        if job.regenerate or job.token_frequencies is not None:
            tokenizer = load_tokenizer(job.base)
            apply_template_file(tokenizer, job.chat_template, job.base)  # before any output is written
        if job.regenerate:
            summary.update(regenerate_file(job, tokenizer, conversations))
        else:
            if os.path.exists(manifest_path(job.out)):  # it described a regeneration that is gone
                os.remove(manifest_path(job.out))
            write_conversations(job.out, conversations)
            summary["written"] = summary["records"] = len(conversations)
        summary["out"] = job.out
    if job.token_frequencies is not None:
        tokenizer = tokenizer or load_tokenizer(job.base)
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
