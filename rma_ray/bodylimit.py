"""One streamed request-body limit for every HTTP ingress of the pool (the coordinator, the services gateway,
the vision front, the LLM replica's own app), as plain ASGI middleware.

Bytes are counted as the app pulls them from `receive`: a body announced by Content-Length over the limit is
refused before a byte is read, and a chunked (or lying) body is refused as soon as the count passes the limit,
so no app ever holds, parses or spools more than the limit plus one chunk. The refusal (413) is sent by the
middleware itself at that moment; whatever the app then does with the aborted read (a handler that turns any
exception into a 400 or a 500, a multipart parser that wraps it) cannot answer a second time: its messages are
dropped."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("rma.bodylimit")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# (scope, limit in bytes) -> (status, headers, body) of the refusal: each ingress answers in its own shape
Refusal = Callable[[Scope, int], tuple[int, list[tuple[bytes, bytes]], bytes]]


class BodyTooLarge(Exception):
    """Raised from `receive` once the body passed the limit (the 413 has already been sent)."""


def json_refusal(code: str = "body_too_large", *, shape: str = "rma") -> Refusal:
    """A 413 with `{"error": {"code", "message"}}` ("rma"; with the request id where the scope has one) or an
    OpenAI-shaped error ("openai")."""

    def refuse(scope: Scope, limit: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        message = f"the request body is over the limit of {limit:,} bytes; send a smaller body"
        if shape == "openai":
            error: dict[str, Any] = {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        else:
            error = {"code": code, "message": message}
            rid = (scope.get("state") or {}).get("request_id")
            if rid:
                error["request_id"] = rid
        body = json.dumps({"error": error}).encode()
        return (
            413,
            [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
            body,
        )

    return refuse


class BodyLimit:
    """413 for a request body over `max_bytes`, announced (Content-Length) or streamed (chunked), counted as
    read. `max_bytes` may be a callable (read once, on the first request) where the limit comes from settings
    that the app only has at run time."""

    def __init__(self, app: Any, max_bytes: int | Callable[[], int], refusal: Refusal | None = None) -> None:
        self.app, self._max, self.refusal = app, max_bytes, refusal or json_refusal()
        self._limit: int | None = max_bytes if isinstance(max_bytes, int) else None

    @property
    def limit(self) -> int:
        if self._limit is None:
            self._limit = int(self._max())  # type: ignore[operator]
        return self._limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        for name, value in scope.get("headers") or []:
            if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
                await self._refuse(scope, send, limit)
                return
        seen = 0
        started = refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await self._refuse(scope, send, limit)
                    raise BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 went out already: the app's own answer to the aborted read is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not refused:
                raise
            # the app let the aborted read (or what it made of it) escape: the client has its 413 already
            log.debug("request body over %d bytes refused", limit)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        status, headers, body = self.refusal(scope, limit)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
