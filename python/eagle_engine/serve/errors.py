"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered to the client as-is (never a bare 500 for bad input)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request: Request | None = None) -> JSONResponse:
        serve = getattr(request.app.state, "serve", None) if request is not None else None
        if serve is not None:  # counted in the app's metrics
            serve.metrics.rejected.labels(str(self.status)).inc()
        return JSONResponse(self.body(), status_code=self.status)


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
    message = (
        f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    )
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return invalid(message, param, "invalid_value").response(request)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    message = f"internal error: {type(exc).__name__}: {exc}"
    return APIError(message, 500, None, "internal_error", "server_error").response(request)


def install_handlers(app) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
