"""Helpers shared by the ``eagle`` commands: model directory and tokenizer checks, flags every command takes
(``--threads``, ``--seed``, ``--stop-token-ids``), result lines."""

from __future__ import annotations

import argparse
import os

from ..engine.cpu_threads import default_threads
from ..errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_model_dir(model_dir: str):
    """The model's config (:func:`eagle_engine.models.load_model_config`): fails first, and by name, on a
    missing directory or ``config.json``, before a tokenizer is looked for."""
    from ..models import load_model_config

    return load_model_config(model_dir)


def load_tokenizer(model_dir: str):
    """The model directory's own tokenizer (``transformers.AutoTokenizer``, local files only)."""
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model directory not found: {model_dir}")
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"no tokenizer in {model_dir} (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer "
            "files of the original checkpoint into the model directory"
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------- threads


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads (see :func:`default_threads`)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: min(4, max(1, cores // 2)), "
        f"{default_threads()} on this machine)",
    )


# ------------------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def port_int(text: str) -> int:
    """A TCP port: 1 to 65535."""
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text}")
    return value


def non_negative_seconds(text: str) -> float:
    """A duration in seconds: a finite number >= 0."""
    value = _seconds(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds: a finite number > 0."""
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text}")
    return value


def seed_int(text: str) -> int:
    """A seed: an integer in the int64 range (what ``torch.Generator.manual_seed`` takes)."""
    value = _int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from {INT64_MIN} to {INT64_MAX}, got {text}")
    return value


def token_id_list(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; ``""`` -> ``[]`` (stop at no token, not even eos)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    ids = []
    for t in items:
        value = _int(t)
        if value < 0:
            raise argparse.ArgumentTypeError(f"token ids are >= 0, got {t}")
        ids.append(value)
    return ids


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def add_stop_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stop-token-ids",
        type=token_id_list,
        default=None,
        metavar="ID,ID",
        help="comma-separated token ids that end generation (kept in the output); default: the model's eos "
        "ids; '' stops at none. A llama2.c-style model ends a document with BOS: pass its id (often 1)",
    )


# --------------------------------------------------------------------------------------------- output


def report(label: str, result, text: str | None = None) -> None:
    if text is not None:
        print(text)
    line = f"[{label}] {len(result.tokens)} tokens in {result.total_seconds:.3f} s: "
    line += f"{result.tokens_per_second:.1f} tokens/s (stop: {result.stop_reason})"
    print(line)
    if result.accept_lengths:
        print(f"mean acceptance length: {result.mean_accept_length:.2f}")
