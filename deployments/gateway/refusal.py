"""How an error reaches a client: one exception, `Refusal(status, code, message, retry_after_s)`, raised
anywhere on a request path (a route, a dependency, a backend replica: it pickles, so it crosses Ray), and one
installer, `install_refusals(app, shape)`, that answers it in the shape the app's clients expect:

- "pool" (the `/api` apps): `{"error": {"code", "message"}}`, plus `request_id` where the request has one;
- "openai" (the `/v1` apps): `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises
  the matching exception with the message.

A 401 carries `WWW-Authenticate: Bearer`, a refusal with `retry_after_s` a `Retry-After`. The installer also
turns FastAPI's validation errors and Starlette's HTTP errors into refusals, and (pool shape) any other
exception into a 500 whose body says only that the request id is in the logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("rma.gateway")
Shape = Literal["pool", "openai"]


class Refusal(Exception):
    """A refusal with an HTTP status, a stable code and a message for a person (what was wrong, what to do).
    `param`: the request field at fault (OpenAI's error field; the OpenAI shape shows it)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after_s: float | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # every field in args: it pickles
        super().__init__(status, code, message, retry_after_s, param, headers)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s, self.param, self.extra_headers = retry_after_s, param, headers

    def __str__(self) -> str:
        return self.message

    def headers(self) -> dict[str, str] | None:
        """WWW-Authenticate on a 401, Retry-After with `retry_after_s`, and the refusal's own (a quota's
        X-RateLimit-*)."""
        out = dict(self.extra_headers or {})
        if self.status == 401:
            out["WWW-Authenticate"] = "Bearer"
        elif self.retry_after_s:
            out["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return out or None

    def pool_body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}

    def openai_body(self) -> dict[str, Any]:
        if self.status == 401:
            kind = "authentication_error"
        elif self.status == 503 and self.code.startswith("keyring_"):
            kind = "service_unavailable"
        else:
            kind = "invalid_request_error" if 400 <= self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, shape: Shape = "pool", request_id: str | None = None) -> JSONResponse:
        body = self.openai_body() if shape == "openai" else self.pool_body(request_id)
        return JSONResponse(body, status_code=self.status, headers=self.headers())


class UnknownKey(Refusal):
    """A well-formed client key whose id the replica's keyring does not know (created since its last
    refresh?): the key check refreshes the keyring once and checks again before it refuses."""

    def __init__(self, message: str = "unknown or revoked API key") -> None:
        super().__init__(401, "invalid_api_key", message)
        self.args = (message,)


def bad_request(code: str, message: str) -> Refusal:
    return Refusal(400, code, message)


def not_found(what: str, ident: object) -> Refusal:
    return Refusal(404, "not_found", f"no {what} with id {ident}")


def unavailable(code: str, message: str, retry_after_s: float = 5.0) -> Refusal:
    return Refusal(503, code, message, retry_after_s)


def unwrap(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (Ray re-raises remote errors wrapped, with `.cause`)."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and isinstance(exc.cause, BaseException):
        exc = exc.cause
        seen += 1
    return exc


def refusal_from(exc: BaseException) -> Refusal | None:
    """The Refusal a replica raised, as a plain Refusal (Ray re-raises it as a subclass of its own, with
    `.cause`); None when the error is no refusal."""
    inner = unwrap(exc)
    if not isinstance(inner, Refusal):
        return None
    return Refusal(
        inner.status, inner.code, inner.message, inner.retry_after_s, inner.param, inner.extra_headers
    )


def validation_message(errors: Iterable[Any], most: int = 5) -> str:
    """Pydantic's errors as one line a person can act on: `field.path: what is wrong; ...`."""
    parts = []
    for e in list(errors)[:most]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def request_id(request: Request) -> str | None:
    """The request's id where the app gives requests one (the services' middleware), else None."""
    rid = getattr(request.state, "request_id", None)
    return (request.headers.get("x-request-id") or rid) if rid is not None else None


def install_refusals(app: FastAPI, shape: Shape = "pool", *, catch_all: bool = False) -> None:
    """Install the app's handlers: Refusal, validation errors (422 `invalid_request`), Starlette's HTTP errors
    (404 `not_found`, 405 `method_not_allowed`), and with `catch_all` any other exception (a Refusal from a
    replica, unwrapped; anything else a logged 500 `internal_error`)."""

    async def _refused(request: Request, exc: Refusal) -> JSONResponse:
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("request %s failed: %s %s: %s", request_id(request), exc.status, exc.code, exc.message)
        return exc.response(shape, request_id(request))

    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI parses a JSON body before it runs the route's dependencies: a body that is not JSON would be
        # answered 422 before the key was looked at. The key comes first (a request checked already is not
        # checked, nor counted, twice).
        refused = await _key_refusal(request)
        return await _refused(
            request, refused or Refusal(422, "invalid_request", validation_message(exc.errors()))
        )

    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body", also before the route's dependencies
            refused = await _key_refusal(request)
            if refused is not None:
                return await _refused(request, refused)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if shape == "openai" and exc.status_code == 404 and "model" in str(exc.detail).lower():
            code = "model_not_found"
        return await _refused(request, Refusal(exc.status_code, code, short(str(exc.detail))))

    app.add_exception_handler(Refusal, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    if not catch_all:
        return

    async def _other(request: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, Refusal):
            return await _refused(request, inner)
        log.exception("request %s failed", request_id(request))
        return Refusal(
            500, "internal_error", "the server failed on this request; the request id is in the logs"
        ).response(shape, request_id(request))

    app.add_exception_handler(Exception, _other)


async def _key_refusal(request: Request) -> Refusal | None:
    """The refusal the route's client-key check gives this request, if the route has one and it refuses."""
    if not _needs_client_key(request):
        return None
    from deployments.gateway.auth import current_client

    try:
        await current_client(request)
    except Refusal as refused:
        return refused
    return None


def _needs_client_key(request: Request) -> bool:
    """Whether the matched route runs the client-key check (its own dependency or the app's)."""
    from deployments.gateway.auth import current_client

    dependant = getattr(request.scope.get("route"), "dependant", None)
    todo, seen = [dependant] if dependant is not None else [], 0
    while todo and seen < 200:
        d = todo.pop()
        seen += 1
        if d.call is current_client:
            return True
        todo.extend(d.dependencies)
    return False


def short(message: str) -> str:
    """vLLM's messages come wrapped ('Message: ..., Internal exception: ...'): keep the first part."""
    if message.startswith("Message: "):
        message = message[len("Message: ") :].split(", Internal exception:")[0]
    return message[:500]
