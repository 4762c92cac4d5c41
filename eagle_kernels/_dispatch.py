"""Which implementation each op runs, and the record of what ran.

Every public op of :mod:`eagle_kernels` asks :func:`pick` which implementation runs for its inputs (its CUDA
op, its Triton kernel or its reference); the answer is recorded, so that :func:`backends` can say afterwards
what each op really ran. An implementation that exists but cannot take the inputs (no compiled extension, an
unsupported dtype or head size) on a CUDA tensor is a *fallback*: it warns once per op and reason, and with
``EAGLE_KERNELS_STRICT=1`` it raises :class:`KernelFallbackError` instead. The reference chosen on purpose
(``EAGLE_KERNELS_BACKEND=reference`` or :func:`reference_backend`, e.g. for training's autograd) and CPU
tensors without ``TRITON_INTERPRET=1`` are not fallbacks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch


class KernelFallbackError(RuntimeError):
    """An op on a CUDA tensor would have run a slower implementation than its kernel, under
    ``EAGLE_KERNELS_STRICT=1``."""


_lock = threading.Lock()
_forced = [0]  # depth of reference_backend() blocks open, in any thread
_ran: dict[str, dict] = {}  # op -> what its latest call ran: {"backend", "device", "reason"}
_warned: set[tuple[str, str]] = set()


@contextlib.contextmanager
def reference_backend():
    """Run every op through :mod:`eagle_kernels.reference` inside the block, e.g. for autograd (training):
    the kernels have no backward. Process-wide (every thread, the engine's too), nestable."""
    with _lock:
        _forced[0] += 1
    try:
        yield
    finally:
        with _lock:
            _forced[0] -= 1


def reference_forced() -> bool:
    """Whether the reference is chosen on purpose: inside :func:`reference_backend`, or
    ``EAGLE_KERNELS_BACKEND=reference``."""
    return _forced[0] > 0 or os.environ.get("EAGLE_KERNELS_BACKEND", "") == "reference"


def strict() -> bool:
    """``EAGLE_KERNELS_STRICT=1``: a fallback on a CUDA tensor raises :class:`KernelFallbackError`."""
    return os.environ.get("EAGLE_KERNELS_STRICT", "0") == "1"


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether Triton kernels should run for tensors like ``x`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if reference_forced():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


_NOT_OFFERED = object()


def pick(op: str, x: torch.Tensor, *, cuda=_NOT_OFFERED, triton=_NOT_OFFERED) -> str:
    """The implementation ``op`` runs for inputs like ``x``: ``"cuda"``, ``"triton"`` or ``"reference"``,
    recorded for :func:`backends`.

    ``cuda`` / ``triton``: offered where ``op`` has that implementation, as ``None`` when it can take these
    inputs or as the reason it cannot (or a function returning either, called only where it applies). The
    first offered one that applies to ``x`` and can run is taken: the CUDA op applies to CUDA tensors, Triton
    to CUDA tensors and, under ``TRITON_INTERPRET=1``, CPU ones; none applies while the reference is forced.
    Passing over an applicable implementation on a CUDA tensor is a fallback: warned once per op and reason,
    an error under ``EAGLE_KERNELS_STRICT=1``.
    """
    refused = None
    for backend, unsupported in (("cuda", cuda), ("triton", triton)):
        if unsupported is _NOT_OFFERED or reference_forced():
            continue
        if not (x.is_cuda if backend == "cuda" else triton_enabled(x)):
            continue
        if callable(unsupported):
            unsupported = unsupported()
        if unsupported is None:
            _ran[op] = {"backend": backend, "device": x.device.type, "reason": refused}
            return backend
        refused = refused or f"no {backend}: {unsupported}"
        if x.is_cuda:
            _fallback(op, backend, unsupported)
    reason = "reference forced" if reference_forced() else refused
    _ran[op] = {"backend": "reference", "device": x.device.type, "reason": reason}
    return "reference"


def _fallback(op: str, backend: str, unsupported: str) -> None:
    message = f"eagle_kernels.{op}: its {backend} implementation cannot run here ({unsupported})"
    if strict():
        raise KernelFallbackError(message + "; EAGLE_KERNELS_STRICT=1 forbids the slower fallback")
    if (op, unsupported) not in _warned:
        _warned.add((op, unsupported))
        warnings.warn(message + "; falling back to a slower implementation", stacklevel=4)


def backends() -> dict[str, dict]:
    """What each op ran at its latest call in this process: ``{op: {"backend": "cuda" | "triton" |
    "reference", "device": "cuda" | "cpu" | ..., "reason": why not a faster one, or None}}``."""
    return {op: dict(v) for op, v in sorted(_ran.items())}


def format_backends() -> str:
    """:func:`backends` as a plain-text table (op, device, backend, reason)."""
    rows = [("op", "device", "backend", "reason")]
    rows += [(op, v["device"], v["backend"], v["reason"] or "") for op, v in backends().items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)


def reset_backends() -> None:
    """Forget what ran (and which fallbacks were warned about)."""
    _ran.clear()
    _warned.clear()
