"""Typed exceptions of the victim API client, one class per failure (anthropic-sdk-python style).

Every HTTP error carries the status, the stable error ``code`` and ``message`` of the API's error
body (KServe v2's ``{"error": "<message>", "code", "type"}`` on ``/v2`` routes, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` elsewhere), the server's ``X-Request-ID`` and
the response headers. :func:`error_from_response` maps a response to the right class.
"""

from __future__ import annotations

import math

import httpx


class VictimAPIError(Exception):
    """Base of every client error."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        response: httpx.Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.response = response if response is not None else httpx.Headers()

    def __str__(self) -> str:
        parts = [f"{self.status_code}" if self.status_code else None, self.code, self.message]
        text = ": ".join(p for p in parts if p)
        return f"{text} (request id {self.request_id})" if self.request_id else text


class APIConnectionError(VictimAPIError):
    """The request did not get a response: connection refused, reset, or timed out."""


class AuthenticationError(VictimAPIError):
    """401: missing, unknown, wrong or revoked API key."""


class PermissionDeniedError(VictimAPIError):
    """403: the key may not use this model or output mode."""


class NotFoundError(VictimAPIError):
    """404: unknown model or route."""


class PayloadTooLargeError(VictimAPIError):
    """413: body or batch over the server's limits."""


class InvalidInputError(VictimAPIError):
    """400 / 422: the request or its tensor was not accepted."""


class RateLimitError(VictimAPIError):
    """429 ``rate_limited``: retry after ``retry_after`` seconds."""

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait, from ``retry-after-ms`` then ``Retry-After``; None when absent."""
        return retry_after_seconds(self.response)


class BudgetExhaustedError(VictimAPIError):
    """429 ``budget_exhausted``: the key's lifetime budget is spent; never worth retrying."""


class ServerError(VictimAPIError):
    """5xx: the server failed or is unavailable."""


_BY_STATUS: dict[int, type[VictimAPIError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: InvalidInputError,
}


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The server's requested wait: ``retry-after-ms`` (precise) first, then ``Retry-After`` seconds."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue  # an HTTP date: not sent by this API, ignored
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def error_from_response(response: httpx.Response) -> VictimAPIError:
    """The typed exception of an error response, parsed from the API's error envelope."""
    code: str | None = None
    message = response.reason_phrase or f"HTTP {response.status_code}"
    try:
        body = response.json()
        error = body.get("error")
        if isinstance(error, str):  # KServe v2: the message is the string, the code beside it
            code, message = body.get("code"), error or message
        elif isinstance(error, dict):  # OpenAI's envelope
            code, message = error.get("code"), error.get("message") or message
    except (ValueError, AttributeError):
        pass
    status = response.status_code
    if status == 429:
        cls: type[VictimAPIError] = BudgetExhaustedError if code == "budget_exhausted" else RateLimitError
    elif status >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status, VictimAPIError)
    return cls(
        message,
        status_code=status,
        code=code,
        request_id=response.headers.get("x-request-id"),
        response=response.headers,
    )
