"""Validation of generation requests: prompts, token ids, stop ids, token budgets, seeds."""

from __future__ import annotations

import operator
import random
from collections.abc import Iterable

import torch

from ..errors import InvalidRequestError


def normalize_prompts(input_ids, vocab_size: int, max_length: int) -> tuple[list[list[int]], bool]:
    """Accept one prompt (list of ints, 1-D tensor) or a batch (list of lists, 2-D tensor).

    Returns ``(prompts, is_batch)``. Raises :class:`InvalidRequestError` for an empty prompt or batch, a token
    id outside ``[0, vocab_size)``, or a prompt that leaves no room below ``max_length``.
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2) or input_ids.is_floating_point():
            raise InvalidRequestError(
                f"input_ids must be a 1-D or 2-D integer tensor, got {input_ids.dtype} "
                f"of shape {tuple(input_ids.shape)}"
            )
        input_ids = input_ids.tolist()
    elif hasattr(input_ids, "tolist") and not isinstance(input_ids, (list, tuple)):  # e.g. a NumPy array
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)):
        raise InvalidRequestError(
            f"input_ids must be a list of token ids or a list of such lists, got {type(input_ids).__name__}"
        )
    is_batch = len(input_ids) > 0 and all(isinstance(p, (list, tuple)) for p in input_ids)
    prompts = [_token_ids(p) for p in input_ids] if is_batch else [_token_ids(input_ids)]
    if not prompts:
        raise InvalidRequestError("empty batch of prompts")
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}" if is_batch else "prompt"
        if not prompt:
            raise InvalidRequestError(f"{where} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{where} holds token id {bad[0]!r} outside the vocabulary [0, {vocab_size})"
            )
        if len(prompt) >= max_length:
            raise InvalidRequestError(
                f"{where} has {len(prompt)} tokens; the model's maximum length is "
                f"{max_length}, leaving no room to generate"
            )
    return prompts, is_batch


def _token_ids(prompt) -> list[int]:
    """Python ints from integer-like ids (``int``, NumPy or 0-d torch integers); anything else is an error."""
    ids = []
    for t in prompt:
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))  # rejects floats, strings, lists
        except TypeError:
            raise InvalidRequestError(f"token ids must be integers, got {t!r}") from None
    return ids


def _as_int(value) -> int:
    """``value`` as a Python int when integer-like (``int``, NumPy or 0-d torch integers); bools, floats and
    strings raise ``TypeError``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError
    return operator.index(value)


def normalize_stop_ids(
    stop_token_ids: Iterable[int] | int | None, default: Iterable[int], vocab_size: int | None = None
) -> frozenset[int]:
    """``None`` -> the model's own end-of-sequence ids (``default``); an id or an iterable of ids otherwise,
    each an integer (NumPy integers too) in ``[0, vocab_size)`` (no range check when ``vocab_size`` is None).
    """
    if stop_token_ids is None:
        return frozenset(default)
    rule = "integer token ids" if vocab_size is None else f"integer token ids in [0, {vocab_size})"
    try:
        ids = [_as_int(stop_token_ids)]
    except TypeError:
        if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Iterable):
            raise InvalidRequestError(
                f"stop_token_ids must be an id or a list of {rule}, got {stop_token_ids!r}"
            ) from None
        ids = list(stop_token_ids)
        try:
            ids = [_as_int(t) for t in ids]
        except TypeError:
            raise InvalidRequestError(f"stop_token_ids must be {rule}, got {ids!r}") from None
    bad = [t for t in ids if vocab_size is not None and not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop_token_ids must be {rule}, got {bad[0]!r}")
    return frozenset(ids)


def check_max_new_tokens(max_new_tokens) -> int:
    """An integer >= 0 (NumPy integers accepted; bools and floats are errors)."""
    try:
        value = _as_int(max_new_tokens)
    except TypeError:
        value = -1
    if value < 0:
        raise InvalidRequestError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return value


SEED_MIN, SEED_MAX = -(2**63), 2**63  # int64: what torch.Generator.manual_seed and NumPy int64 hold


def check_seeds(seed, batch: int) -> list[int]:
    """One seed per sequence of a batch of ``batch``.

    ``None`` -> one fresh random seed (``random.SystemRandom``) shared by all; an int (NumPy integers
    accepted, bools rejected) -> that seed for every sequence, so a sequence samples alike alone or in a
    batch; a list or tuple of ``batch`` ints -> one each. Every seed must lie in int64 ``[-2**63, 2**63)``.
    Anything else is an :class:`InvalidRequestError` naming ``seed`` and this rule.
    """
    rule = f"seed must be None, an integer in [-2**63, 2**63) or a list of {batch} such integers"
    if seed is None:
        return [random.SystemRandom().randrange(2**63)] * batch
    try:
        seeds = [_as_int(seed)] * batch
    except TypeError:
        if not isinstance(seed, (list, tuple)) or len(seed) != batch:
            raise InvalidRequestError(f"{rule}, got {seed!r}") from None
        try:
            seeds = [_as_int(s) for s in seed]
        except TypeError:
            raise InvalidRequestError(f"{rule}, got {seed!r}") from None
    if not all(SEED_MIN <= s < SEED_MAX for s in seeds):
        raise InvalidRequestError(f"{rule}, got {seed!r}")
    return seeds
