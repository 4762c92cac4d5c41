"""Request bodies above a size limit are refused at once, before they are read or parsed (HTTP 413)."""

from __future__ import annotations

import json

from .errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024  # 2 MiB: far more text than any context this engine serves


class _TooLarge(BaseException):  # not an Exception: no handler inside the app may turn it into a 400
    pass


def _error_body(limit: int) -> bytes:
    message = f"the request body exceeds this server's limit of {limit} bytes (--max-request-bytes)"
    return json.dumps(APIError(message, 413, None, "request_too_large").body()).encode()


class BodyLimit:
    """ASGI middleware: a ``Content-Length`` over ``max_bytes`` answers 413 without reading the body; a body
    sent without one (chunked) is counted as it arrives and cut off at the limit."""

    def __init__(self, app, max_bytes: int, on_refused=None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        if self.on_refused is not None:
            self.on_refused()
        body = _error_body(self.max_bytes)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
