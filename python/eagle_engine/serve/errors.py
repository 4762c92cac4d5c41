"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_S = 1  # what a 503 (queue full, shutting down) asks a client to wait before retrying


class APIError(Exception):
    """An error answered to the client as-is (never a bare 500 for bad input)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = dict(headers or {})
        if status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request: Request | None = None) -> JSONResponse:
        serve = getattr(request.app.state, "serve", None) if request is not None else None
        if serve is not None:  # counted in the app's metrics
            serve.metrics.rejected.labels(str(self.status)).inc()
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param, code)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response(request)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's findings as one 400: malformed JSON, a missing field, a value of the wrong type."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}"
        return invalid(message, None, "invalid_json").response(request)
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}: this server does not take it (see the README's list of fields)"
        return invalid(message, param, "unknown_field").response(request)
    message = (
        f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    )
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return invalid(message, param, "invalid_value").response(request)


_HTTP_CODES = {404: ("not_found", "no such endpoint"), 405: ("method_not_allowed", "method not allowed"),
               413: ("request_too_large", "request body too large")}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method, a body it cannot read) in the OpenAI shape."""
    code, default = _HTTP_CODES.get(exc.status_code, ("http_error", "request failed"))
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else default
    if exc.status_code == 404:
        detail = f"{request.method} {request.url.path}: no such endpoint (see /v1/models, /v1/completions, " \
                 "/v1/chat/completions, /health, /metrics)"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 400:  # the body could not be read (e.g. not UTF-8)
        code, detail = "invalid_json", f"the request body cannot be read as JSON: {detail}"
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    error = APIError(detail, exc.status_code, None, code, kind, headers=getattr(exc, "headers", None))
    return error.response(request)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    message = f"internal error: {type(exc).__name__}: {exc}"
    return APIError(message, 500, None, "internal_error", "server_error").response(request)


def install_handlers(app) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
