"""``eagle convert-head``: rewrite an EAGLE draft head in the official, SGLang or vLLM (speculators) format
(the formats: :mod:`eagle_engine.models.head_formats`)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ..errors import CheckpointMismatchError, EagleError, ModelLoadError, UnsupportedModelError
from ..models.config import ModelConfig
from ..models.draft import build_head
from ..models.head_formats import FORMATS, TargetInfo, read_head, write_head
from ..models.medusa import is_medusa_dir


def convert_head(src: str, to: str, out: str, base: str | None = None) -> dict:
    """Read the head in ``src`` (any format, told apart by its ``config.json``) and write it to the new or
    empty directory ``out`` in format ``to``. ``base``: the target model directory (optional): the head is
    checked against it, and its identity recorded where the format has room (vLLM's verifier, the target
    layers feeding an EAGLE-3 head). Without it, a vLLM head's verifier, when a model directory here, checks
    pinned target layers that the official format cannot record.

    Returns ``{"from": format, "to": format, "kind": "eagle1"|"eagle3", "out": out}``. Errors name the
    problem: :class:`ModelLoadError` (a missing head or file), :class:`UnsupportedModelError` (an unknown
    format, a head the target format cannot express), :class:`CheckpointMismatchError` (weights that do not
    fit the head's config), :class:`DraftMismatchError` (a head that does not fit ``base``),
    :class:`EagleError` (an ``out`` in the way).
    """
    from ..models.loading import detect_kind

    if to not in FORMATS:
        raise UnsupportedModelError(f"unknown head format {to!r}: choose one of {', '.join(FORMATS)}")
    if not os.path.isdir(src):
        raise ModelLoadError(f"draft head directory not found: {src}")
    if is_medusa_dir(src):
        raise UnsupportedModelError(f"{src} holds Medusa heads, which have one format (convert EAGLE heads)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise EagleError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        raise EagleError(f"--out {out} is not empty: give a new or empty directory")
    target = TargetInfo.from_dir(base) if base is not None else None
    files = read_head(src)
    if target is None and to == "official" and files.aux_layers is not None:
        target = _recorded_target(files.verifier)  # to check pinned layers the official format cannot keep
    tensors = files.tensors()
    kind = files.kind or detect_kind(set(tensors), files.config)
    _check_tensors(files.config, tensors, kind, target)
    try:
        write_head(out, to, files.config, tensors, kind=kind, aux_layers=files.aux_layers,
                   verifier=files.verifier, target=target)  # fmt: skip
    except OSError as e:
        raise EagleError(f"--out {out}: cannot write the head: {e.strerror or e}") from None
    return {"from": files.fmt, "to": to, "kind": kind, "out": out}


def _recorded_target(verifier: dict | None) -> TargetInfo | None:
    """The target a vLLM head names as its verifier, when that is a model directory here."""
    path = (verifier or {}).get("name_or_path")
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "config.json")):
        return TargetInfo.from_dir(path)
    return None


def _check_tensors(config: dict, tensors: dict, kind: str, target: TargetInfo | None) -> None:
    """Build the head on the meta device, as :func:`~eagle_engine.models.loading.load_draft` would for
    ``target`` (without one: a stand-in shaped by the head's own config), and compare names and shapes: a
    head that would not load is not written. With ``target``: :func:`build_head`'s fit checks too."""
    tcfg = target.config if target is not None else _stand_in(config, tensors, kind)
    with torch.device("meta"):
        head = build_head(kind, config, SimpleNamespace(config=tcfg), set(tensors))
    own = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if "embed_tokens.weight" not in tensors:
        del own["embed_tokens.weight"]  # taken from the target
    shared = sorted(own.keys() & tensors.keys())
    problems = {
        "missing": sorted(own.keys() - tensors.keys()),
        "unexpected": sorted(tensors.keys() - own.keys()),
        "misshapen": [
            f"{k} {tuple(tensors[k].shape)}, not {own[k]}"
            for k in shared
            if tuple(tensors[k].shape) != own[k]
        ],
    }
    parts = [f"{what}: {', '.join(names[:5])}" for what, names in problems.items() if names]
    if parts:
        raise CheckpointMismatchError(f"the head's weights do not fit its config: {'; '.join(parts)}")


def _stand_in(config: dict, tensors: dict, kind: str) -> ModelConfig:
    """A target config the head fits, when no --base is given (its depth: any that EAGLE-3 accepts)."""
    hidden = config.get("hidden_size")
    if kind == "eagle3":
        hidden = config.get("target_hidden_size", hidden)
    vocab = config.get("vocab_size")
    for name in ("t2d", "embed_tokens.weight"):
        if name in tensors:
            vocab = tensors[name].shape[0]
    if not isinstance(hidden, int) or not isinstance(vocab, int) or hidden <= 0 or vocab <= 0:
        raise UnsupportedModelError(
            f"the head's config.json lacks hidden_size or vocab_size (got {hidden!r}, {vocab!r}): pass --base"
        )
    return ModelConfig("llama", vocab, hidden, 1, 32, 1, 1, 2, config.get("max_position_embeddings") or 2048)
