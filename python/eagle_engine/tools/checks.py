"""Checks of user settings; messages name the field and its `eagle` flag (seq_len -> --seq-len)."""

from __future__ import annotations

import math
import os

from ..errors import TrainingInputError


def flag(name: str) -> str:
    """The ``eagle train-draft`` flag of a job field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def check_number(name: str, value, kind: str, low=None, positive: bool = False) -> None:
    """Raise :class:`TrainingInputError` naming field ``name`` (and its flag) unless ``value`` is a finite
    number of ``kind`` (``"int"`` or ``"float"``), ``>= low`` and, with ``positive``, ``> 0``."""
    where = f"{name} ({flag(name)})"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int" and not is_int:
        raise TrainingInputError(f"{where} must be a whole number, got {value!r}")
    if kind == "float" and not (is_int or isinstance(value, float)):
        raise TrainingInputError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise TrainingInputError(f"{where} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise TrainingInputError(f"{where} must be > 0, got {value!r}")
    if low is not None and value < low:
        raise TrainingInputError(f"{where} must be >= {low}, got {value!r}")


def check_output_dir(out: str) -> None:
    """Create ``out`` if needed and prove it writable, or raise :class:`TrainingInputError` naming --out."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".eagle-write-test-{os.getpid()}")  # one per process: ranks probe at once
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingInputError(f"--out {out} is not a writable directory: {e.strerror or e}") from None
