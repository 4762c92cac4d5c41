"""The FastAPI app: OpenAI-compatible completions and chat completions over the continuous-batching scheduler.

``create_app(engine, tokenizer, model_name)`` builds it; the scheduler's engine thread starts and stops with
the app's lifespan. Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
import time

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..engine.handles import Output
from ..engine.handles import Request as EngineRequest
from ..engine.inputs import check_seeds
from ..engine.scheduler import KVCacheTooSmallError, QueueFullError, QueueTimeoutError
from ..errors import InvalidRequestError
from ..tools.detokenize import IncrementalDetokenizer
from .errors import APIError, install_handlers, invalid
from .limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    StreamOptions,
    chat_chunk,
    chat_object,
    check_unsupported,
    completion_object,
    max_tokens_of,
    new_id,
    sampling_of,
    stop_strings_of,
    usage,
)

DEFAULT_QUEUE_TIMEOUT = 300.0  # seconds a request may wait for a slot before it is answered 503


class LockedTokenizer:
    """The tokenizer behind one lock: the event loop encodes while the engine thread decodes, and a Hugging
    Face fast tokenizer is not safe to share between threads."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lock = tokenizer, threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids, **kwargs) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, **kwargs)

    def render_chat(self, messages: list[dict]) -> str:
        with self.lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


class ServeState:
    def __init__(self, engine, tokenizer, model_name: str, max_queue: int, queue_timeout: float | None):
        self.engine, self.model_name = engine, model_name
        # Two tokenizers: requests are encoded (and chat templates rendered) on a worker thread with a copy,
        # while the engine thread decodes with the original, so a long prompt never holds up a stream.
        self.tokenizer = LockedTokenizer(tokenizer)
        self.encoder = LockedTokenizer(copy.deepcopy(tokenizer))
        self.encoding = anyio.CapacityLimiter(1)
        cfg = engine.target.config
        self.vocab_size, self.eos_ids = cfg.vocab_size, frozenset(cfg.eos_token_ids)
        self.max_model_len = engine.max_length
        self.speculative = engine.method is not None  # the engine's method, else vanilla steps
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.scheduler = engine.scheduler  # the engine's one driver: the Python API queues there too
        self.metrics = Metrics(lambda: self.scheduler)
        self.scheduler.observer = self.metrics
        self.created = int(time.time())


def create_app(engine, tokenizer, model_name: str = "eagle", max_queue: int = 256,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT) -> FastAPI:
    """The app over ``engine``'s scheduler (its runner's ``max_batch_size`` slots, its ``max_model_len``): at
    most ``max_queue`` requests wait for a slot, more answer 503; one that waits ``queue_timeout`` seconds
    (or its own ``timeout``) answers 503 without starting; a body over ``max_request_bytes`` answers 413
    before it is read."""
    state = ServeState(engine, tokenizer, model_name, max_queue, queue_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        state.scheduler.stop()

    app = FastAPI(title="eagle", lifespan=lifespan)
    app.state.serve = state
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes,
                       on_refused=lambda: state.metrics.rejected.labels("413").inc())

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        scheduler = state.scheduler
        if scheduler.channel.broken:
            problem = "a tensor-parallel rank is gone: this server cannot serve"
        elif not scheduler.alive:
            problem = "the engine thread is not running"
        else:
            return {"status": "ok"}
        return APIError(problem, 503, None, "unhealthy", "server_error").response(request)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "eagle",
                "max_model_len": state.max_model_len}  # the context length, as vLLM's cards give it
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        prompt = await _off_the_loop(state, _completion_prompt, body)
        max_tokens = max_tokens_of(body.max_tokens, len(prompt), state.max_model_len, "max_tokens")
        return await _respond(state, request, body, prompt, max_tokens, arrival, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        prompt = await _off_the_loop(state, _chat_prompt, body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max_tokens_of(requested, len(prompt), state.max_model_len, param)
        return await _respond(state, request, body, prompt, max_tokens, arrival, chat=True)

    return app


# ---------------------------------------------------------------------------------------------- prompts


async def _off_the_loop(state: ServeState, build, body) -> list[int]:
    """``build(state, body)`` (tokenization, a chat template) on a worker thread, one at a time: the event
    loop keeps serving every other client meanwhile."""
    return await anyio.to_thread.run_sync(build, state, body, limiter=state.encoding)


def _check_common(state: ServeState, body) -> None:
    if body.model is not None and body.model != state.model_name:
        raise APIError(
            f"the model {body.model!r} does not exist; this server serves {state.model_name!r}",
            404,
            "model",
            "model_not_found",
        )
    check_unsupported(body)


def _check_length(state: ServeState, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise invalid(f"{param} is empty", param)
    if len(ids) >= state.max_model_len:
        raise invalid(
            f"{param} has {len(ids)} tokens; this model's maximum context length is {state.max_model_len}, "
            "leaving no room to generate",
            param,
            "context_length_exceeded",
        )
    return ids


def _completion_prompt(state: ServeState, body: CompletionRequest) -> list[int]:
    _check_common(state, body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise invalid(f"one prompt per request, got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = state.encoder.encode(prompt) if prompt else []
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise invalid(
                f"prompt holds token id {bad[0]} outside the vocabulary [0, {state.vocab_size})", "prompt"
            )
    return _check_length(state, ids, "prompt")


def _chat_prompt(state: ServeState, body: ChatCompletionRequest) -> list[int]:
    _check_common(state, body)
    if not state.encoder.has_chat_template:
        raise invalid(
            f"the model {state.model_name!r} has no chat template (tokenizer.chat_template is unset); "
            "use /v1/completions",
            "messages",
            "no_chat_template",
        )
    if not body.messages:
        raise invalid("messages is empty", "messages")
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise invalid(
                    f"messages[{i}].content: only text parts are supported", f"messages.{i}.content"
                )
            content = "".join(str(part.get("text", "")) for part in content)
        message = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name  # (the chat template decides what a name does)
        messages.append(message)
    try:
        text = state.encoder.render_chat(messages)
    except Exception as e:  # the template rejects the conversation (jinja's TemplateError and friends)
        raise invalid(f"the chat template cannot render these messages: {e}", "messages") from None
    return _check_length(state, state.encoder.encode(text, add_special_tokens=False), "messages")


# --------------------------------------------------------------------------------------------- generation


async def _respond(state: ServeState, request: Request, body, prompt: list[int], max_tokens: int,
                   arrival: float, chat: bool):
    params = sampling_of(body)
    try:
        seed = check_seeds(body.seed, 1)[0]  # None: a fresh random seed
    except InvalidRequestError as e:
        raise invalid(str(e), "seed") from None
    stop_ids = set() if body.ignore_eos else set(state.eos_ids)
    for t in body.stop_token_ids or []:
        if not 0 <= t < state.vocab_size:
            raise invalid(f"stop_token_ids holds {t}, outside the vocabulary", "stop_token_ids")
        stop_ids.add(t)
    engine_request = EngineRequest(
        prompt,
        max_tokens,
        params,
        seed,
        frozenset(stop_ids),
        stop_strings_of(body),
        IncrementalDetokenizer(state.tokenizer, prompt),
        speculative=state.speculative,
        priority=body.priority or 0,
        timeout=body.timeout if body.timeout is not None else state.queue_timeout,
        arrival=arrival,
    )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(output):
        loop.call_soon_threadsafe(queue.put_nowait, output)

    try:
        handle = state.scheduler.submit(engine_request, deliver, max_queue=state.max_queue)
    except QueueFullError as e:
        raise APIError(str(e), 503, None, "queue_full", "server_error") from None
    except InvalidRequestError as e:
        raise invalid(str(e), "prompt") from None
    rid = new_id("chatcmpl" if chat else "cmpl")
    gone = asyncio.ensure_future(_client_gone(request))  # the client leaving, streaming or not
    gone.add_done_callback(lambda task: task.cancelled() or task.exception())  # (an error there is retrieved)
    try:
        first = await _next_output(state, handle, queue, gone)
        if first is None:
            return Response(status_code=499)
        if body.stream:
            events = _sse(state, rid, first, queue, chat, body.stream_options or StreamOptions())
            return _Stream(events, lambda: state.scheduler.cancel(handle))
        return await _collect(state, handle, rid, first, queue, gone, chat)
    except BaseException:
        state.scheduler.cancel(handle)
        raise
    finally:
        gone.cancel()  # (a stream watches the connection itself from here on)


def _raise_for(error: BaseException):
    if isinstance(error, InvalidRequestError):
        raise invalid(str(error)) from None
    if isinstance(error, QueueTimeoutError):
        raise APIError(str(error), 503, "timeout", "queue_timeout", "server_error") from None
    if isinstance(error, KVCacheTooSmallError):
        raise APIError(str(error), 503, None, "kv_cache_too_small", "server_error") from None
    raise APIError(
        f"generation failed: {type(error).__name__}: {error}", 500, None, "engine_error", "server_error"
    )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(queue: asyncio.Queue, gone: asyncio.Future):
    """The next output, or ``None`` when the client disconnected first."""
    get = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():  # (also when this request is cancelled: the server shutting down)
            get.cancel()
    return get.result() if get in done else None


async def _next_output(state, handle, queue: asyncio.Queue, gone: asyncio.Future):
    """The request's next output; its error raised as the HTTP answer; ``None`` (the request cancelled) when
    the client left first."""
    out = await _next(queue, gone)
    if out is None:
        state.scheduler.cancel(handle)
    elif out.error is not None:
        _raise_for(out.error)
    return out


async def _collect(state, handle, rid, first, queue, gone, chat: bool):
    parts, out = [first.text], first
    while out.finish_reason is None:
        out = await _next_output(state, handle, queue, gone)
        if out is None:
            return Response(status_code=499)
        parts.append(out.text)
    text, use = "".join(parts), usage(out.prompt_tokens, out.completion_tokens)
    if chat:
        return chat_object(rid, state.model_name, text, out.finish_reason, use)
    return completion_object(rid, state.model_name, text, out.finish_reason, use)


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(state, rid: str, first, queue: asyncio.Queue, chat: bool, options: StreamOptions):
    """Server-sent events exactly as the OpenAI API streams them, ``data: [DONE]`` last; with
    ``continuous_usage_stats`` each chunk carries the usage so far (the tokens its text is made of)."""
    model = state.model_name

    def chunk(out, text: str) -> dict:
        if chat:
            delta = {"content": text} if text else {}
            body = chat_chunk(rid, model, delta, out.finish_reason)
        else:
            body = completion_object(rid, model, text, out.finish_reason, None, chunk=True)
        if options.continuous_usage_stats:
            body["usage"] = usage(out.prompt_tokens, out.completion_tokens)
        return body

    if chat:
        role = chunk(Output([], "", None, first.prompt_tokens), "")
        role["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield _event(role)
    out = first
    while True:
        if out.error is not None:
            body = APIError(
                f"generation failed: {out.error}", 500, None, "engine_error", "server_error"
            ).body()
            yield _event(body)
            break
        if out.text or out.finish_reason is not None:
            yield _event(chunk(out, out.text))
        if out.finish_reason is not None:
            if options.include_usage:
                final = (
                    chat_chunk(rid, model, {}, None)
                    if chat
                    else completion_object(rid, model, "", None, None)
                )
                final["choices"] = []
                final["usage"] = usage(out.prompt_tokens, out.completion_tokens)
                yield _event(final)
            break
        out = await queue.get()
    yield "data: [DONE]\n\n"


class _Stream(StreamingResponse):
    """A streaming response that notices a client leaving even between chunks and calls ``on_close`` in
    every case (finished, disconnected, failed), so a dropped client's sequence is cancelled at once."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        async def stream():
            try:
                await self.stream_response(send)
            except OSError:  # the client went away mid-send
                pass
            tg.cancel_scope.cancel()

        async def watch():
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            self.on_close()
