"""Pure ASGI middleware: request ids, and the body-size cap counted on the streamed body.

Request ids: the server makes its own for every request (``X-Request-ID`` on the answer, the
``request_id`` of audit events), so a client can neither spoof nor collide audit entries. A
client's own id (``X-Client-Request-ID``, or a client-sent ``X-Request-ID``), when it is a short
safe token, is kept beside it as ``client_request_id`` and echoed as ``X-Client-Request-ID``.

The cap does not trust ``Content-Length``: a declared length over the cap is refused at once, and
the bytes actually received are counted as they stream in, so a chunked or lying body is cut off
at the cap too, before the app has buffered more than that.
"""

from __future__ import annotations

import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLargeError, envelope

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Sets ``scope.state.request_id`` (the server's) and ``client_request_id`` (the client's, or
    ""), answers with ``X-Request-ID`` (and ``X-Client-Request-ID``), and caps the body size."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = dict(scope.get("headers") or [])
        given = headers.get(b"x-client-request-id", headers.get(b"x-request-id", b"")).decode("latin-1")
        client_request_id = given if _SAFE_ID.match(given) else ""
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_request_id
        id_headers = [(b"x-request-id", request_id.encode())]
        if client_request_id:
            id_headers.append((b"x-client-request-id", client_request_id.encode()))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *id_headers]}
            await send(message)

        declared = headers.get(b"content-length")
        limit = self.max_body_bytes
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send_with_id, scope["path"], f"request body over the limit of {limit} bytes")
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"request body over the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send_with_id)

    @staticmethod
    async def _refuse(send: Send, path: str, message: str) -> None:
        body = json.dumps(envelope("invalid_request", "payload_too_large", message, path)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
