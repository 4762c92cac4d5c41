"""Validation of generation requests: prompts, token ids, stop ids, token budgets."""

from __future__ import annotations

import operator
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


def normalize_stop_ids(stop_token_ids: Iterable[int] | int | None, default: Iterable[int]) -> frozenset[int]:
    """``None`` -> the model's own end-of-sequence ids; an int or iterable of ints otherwise."""
    if stop_token_ids is None:
        return frozenset(default)
    if isinstance(stop_token_ids, int):
        return frozenset([stop_token_ids])
    ids = list(stop_token_ids)
    if not all(isinstance(t, int) for t in ids):
        raise InvalidRequestError(f"stop_token_ids must be integers, got {ids!r}")
    return frozenset(ids)


def check_max_new_tokens(max_new_tokens) -> int:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InvalidRequestError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return max_new_tokens
