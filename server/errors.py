"""One error envelope for the whole API: ``{"error": {"type", "code", "message"}}``.

Every failure is raised as a typed :class:`ApiError` and mapped to JSON in one handler; FastAPI's
own validation errors and Starlette's 404/405 are wrapped in the same envelope.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(StarletteHTTPException):
    """Base of every API error: an HTTP status, an error type, a stable machine-readable code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(self.status, message, headers)
        self.code = code or self.default_code
        self.message = message


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


def envelope(type_: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message}}


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
        if isinstance(exc, ApiError):
            body = envelope(exc.type, exc.code, exc.message)
        else:
            type_ = _STATUS_TYPES.get(exc.status_code, "server_error")
            body = envelope(type_, type_, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse(envelope("invalid_input", "invalid_input", "; ".join(parts)), status_code=422)

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        body = envelope(
            "unavailable", "accounting_unavailable", "query accounting is unavailable; retry later"
        )
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            envelope("server_error", "internal_error", "internal server error"), status_code=500
        )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": description,
        "content": {"application/json": {"example": envelope(t, c, description)}},
    }
    for status, t, c, description in [
        (401, "authentication_error", "invalid_api_key", "missing, unknown, wrong or revoked API key"),
        (403, "permission_error", "forbidden", "the key's tier may not use this model or output mode"),
        (404, "not_found", "model_not_found", "unknown model"),
        (413, "invalid_request", "payload_too_large", "body over max_body_bytes or batch over max_batch"),
        (422, "invalid_input", "invalid_input", "shape, dtype, value range or image format not accepted"),
        (429, "budget_exhausted", "budget_exhausted", "rate limited (Retry-After) or lifetime budget spent"),
    ]
}
