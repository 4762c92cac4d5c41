"""Request bodies of the OpenAI API (the fields this server honours) and the response objects it returns.

Types are checked by pydantic; ranges and the fields this server does not implement are checked by
:func:`sampling_of` and friends, so that every message names its parameter.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import InvalidRequestError
from ..speculative.sampling import SamplingParams
from .errors import invalid


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # extension (vLLM's): every chunk carries the usage so far


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never ignored

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's): 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension: ids that end the sequence besides the model's eos
    ignore_eos: bool = False  # extension: do not stop at the model's eos ids (benchmarks)
    priority: int | None = None  # extension (vLLM's): lower starts first; equal: first come, first served
    timeout: float | None = None  # extension: seconds the request may wait for a slot (503 past it)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Fields of the API this server does not implement: declared so that they get a message of their own.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None
    top_logprobs: Any = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # tool_calls and the like: refused, never dropped silently

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


def sampling_of(body: _Common) -> SamplingParams:
    """Temperature (OpenAI's default 1), top_p, top_k; an out-of-range value is a 400 naming it."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = 0 if body.top_k is None else body.top_k
    if temperature < 0:
        raise invalid(f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {top_p}", "top_p")
    if top_k < 0:
        raise invalid(f"top_k must be >= 0 (0 = off), got {top_k}", "top_k")
    try:
        return SamplingParams(float(temperature), float(top_p), int(top_k))
    except InvalidRequestError as e:
        raise invalid(str(e)) from None


UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls",
               "top_logprobs")


def check_unsupported(body: _Common) -> None:
    """Fields of the API this server does not implement answer 400 instead of being silently ignored (and
    the extensions' ranges)."""
    if body.timeout is not None and not (body.timeout > 0 and body.timeout < float("inf")):
        raise invalid(f"timeout must be a number of seconds > 0, got {body.timeout}", "timeout")
    for name in UNSUPPORTED:
        if getattr(body, name) is not None:
            raise invalid(f"{name} is not supported by this server", name, "unsupported_field")
    if body.n not in (None, 1):
        raise invalid(f"n must be 1 (one choice per request), got {body.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise invalid(f"{name} is not supported (must be 0)", name)
    if body.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise invalid("echo is not supported", "echo")
        if body.logprobs is not None:
            raise invalid("logprobs is not supported", "logprobs")
        if body.best_of not in (None, 1):
            raise invalid("best_of must be 1", "best_of")
        if body.suffix:
            raise invalid("suffix is not supported", "suffix")
    elif body.logprobs:
        raise invalid("logprobs is not supported", "logprobs")


def stop_strings_of(body: _Common) -> tuple[str, ...]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise invalid(f"stop takes at most 4 strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise invalid("stop strings must not be empty", "stop")
    return tuple(stops)


def max_tokens_of(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """The completion budget: ``requested`` (must fit the context) or, when unset, the rest of the context."""
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested < 1:
        raise invalid(f"{param} must be at least 1, got {requested}", param)
    if requested > room:
        raise invalid(
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_len + requested} "
            f"were requested ({prompt_len} in the prompt, {requested} for the completion); reduce {param}",
            param,
            "context_length_exceeded",
        )
    return requested


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(rid: str, model: str, text: str, finish: str | None, use: dict | None, chunk=False):
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_object(rid: str, model: str, text: str, finish: str | None, use: dict) -> dict:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
