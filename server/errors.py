"""Error bodies in the format each protocol's stock clients expect, from one set of typed errors.

Every failure is raised as a typed :class:`ApiError` and mapped to JSON in one handler; FastAPI's
own validation errors and Starlette's 404/405 take the same path. The body's shape follows the
route's protocol:

- KServe v2 / Open Inference Protocol (``/v2...``): ``{"error": "<message>", "code", "type"}``: the
  protocol's ``error`` is a string (tritonclient and KServe's clients print it as such); the stable
  ``code`` and the ``type`` stand beside it.
- Everything else (OpenAI-style ``/v1/...``, admin): OpenAI's envelope
  ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger("stealrange.server")

# nginx's status for a request whose client closed the connection: never seen by that client.
CLIENT_CLOSED_REQUEST = 499


class ApiError(StarletteHTTPException):
    """Base of every API error: an HTTP status, an error type, a stable machine-readable code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(self.status, message, headers)
        self.code = code or self.default_code
        self.message = message
        self.param = param


class InvalidRequestError(ApiError):
    status, type, default_code = 400, "invalid_request", "invalid_request"


class AuthenticationError(ApiError):
    status, type, default_code = 401, "authentication_error", "invalid_api_key"


class PermissionDeniedError(ApiError):
    status, type, default_code = 403, "permission_error", "forbidden"


class NotFoundError(ApiError):
    status, type, default_code = 404, "not_found", "not_found"


class PayloadTooLargeError(ApiError):
    status, type, default_code = 413, "invalid_request", "payload_too_large"


class InvalidInputError(ApiError):
    status, type, default_code = 422, "invalid_input", "invalid_input"


class RateLimitError(ApiError):
    status, type, default_code = 429, "rate_limited", "rate_limited"


class BudgetExhaustedError(ApiError):
    status, type, default_code = 429, "budget_exhausted", "budget_exhausted"


class ServiceUnavailableError(ApiError):
    status, type, default_code = 503, "unavailable", "unavailable"


KSERVE_PREFIX = "/v2"


def envelope(type_: str, code: str, message: str, path: str = "", param: str | None = None) -> dict[str, Any]:
    """The error body for a request to ``path``: KServe v2's string ``error`` on ``/v2`` routes,
    OpenAI's object elsewhere (see the module docstring)."""
    if path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/"):
        return {"error": message, "code": code, "type": type_}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_STATUS_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found",
    405: "invalid_request",
    413: "invalid_request",
    422: "invalid_input",
    429: "rate_limited",
}


def install_error_handlers(app: FastAPI) -> None:
    """Map ApiError, HTTP errors, validation errors and anything unexpected to the envelope."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if isinstance(exc, ApiError):
            body = envelope(exc.type, exc.code, exc.message, path, exc.param)
        else:
            type_ = _STATUS_TYPES.get(exc.status_code, "server_error")
            body = envelope(type_, type_, str(exc.detail), path)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        errors = exc.errors()
        for err in errors[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        param = ".".join(str(p) for p in errors[0].get("loc", ())[1:]) if errors else None
        body = envelope("invalid_input", "invalid_input", "; ".join(parts), request.url.path, param or None)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        body = envelope(
            "unavailable",
            "accounting_unavailable",
            "query accounting is unavailable; retry later",
            request.url.path,
        )
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up mid-upload: nobody reads this answer, nothing was charged (every
        # charge comes after the whole body is read), and it is no server error to log.
        logger.info("client disconnected before its request body was read: %s", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            envelope("server_error", "internal_error", "internal server error", request.url.path),
            status_code=500,
        )


_DOCUMENTED_ERRORS = [
    (401, "authentication_error", "invalid_api_key", "missing, unknown, wrong or revoked API key"),
    (403, "permission_error", "forbidden", "the key's tier may not use this output mode"),
    (404, "not_found", "model_not_found", "unknown model, or one this key may not query"),
    (413, "invalid_request", "payload_too_large", "body over max_body_bytes or batch over max_batch"),
    (422, "invalid_input", "invalid_input", "shape, dtype, value range or image format not accepted"),
    (429, "budget_exhausted", "budget_exhausted", "rate limited (Retry-After) or lifetime budget spent"),
]


def _documented(path: str) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"example": envelope(t, c, description, path)}},
        }
        for status, t, c, description in _DOCUMENTED_ERRORS
    }


# OpenAPI ``responses`` of the errors: OpenAI's envelope, and KServe v2's string ``error``.
ERROR_RESPONSES = _documented("/v1")
KSERVE_ERROR_RESPONSES = _documented(KSERVE_PREFIX)
