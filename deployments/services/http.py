"""The services gateway's HTTP plumbing: the app's context (backends, settings, the backend caller) as a route
dependency, the key check with the per-client rate, request ids and the body limit as ASGI middleware, and the
readers of bodies that a route takes by hand (JSON that may also be a multipart file, an upload's bytes)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.gateway.asgi import body_limit, path_under_root
from deployments.gateway.auth import current_client
from deployments.gateway.keys import ClientIdentity
from deployments.gateway.refusal import Refusal, unavailable, unwrap, validation_message
from deployments.services.backends import Backends
from deployments.services.settings import ServicesSettings
from rma_ray.edges import SERVED_BY_HEADER

log = logging.getLogger("rma.services.api")
SERVED_BY = SERVED_BY_HEADER.encode()
DIED = {"ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError"}
FileParts = tuple[bytes, str | None, str | None, dict[str, str]]


class ClientLimiter:
    """Per-client request rate (the `limits` library, sliding window counter, in this replica's memory): one
    client cannot take the whole gateway; past the rate it gets 429 with Retry-After. The sliding window
    counter costs the same per request at any rate (a moving window keeps one timestamp per request in the
    window)."""

    def __init__(self, rate: str) -> None:
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import SlidingWindowCounterRateLimiter

        self.item = parse(rate)
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def hit(self, client: ClientIdentity) -> None:
        if not self._limiter.hit(self.item, client.key_id):
            reset = self._limiter.get_window_stats(self.item, client.key_id).reset_time
            retry = max(1, math.ceil(reset - time.time()))
            raise Refusal(
                429,
                "rate_limited",
                f"this API key sent more than {self.item} requests; retry in {retry} s",
                retry,
            )


def _database_away(exc: BaseException) -> bool:
    from deployments.services.db import connection_error

    return connection_error(exc)


class BackendCaller:
    """One backend call with the gateway's time limit; Serve's refusals become 503s with Retry-After, and an
    idempotent call (`retry`) is sent once more when the replica it reached died under it. A call that hands
    the caller's file to a parser (`hostile`) is never retried: a replica that died under it is taken as the
    file's doing (one bomb must not take down a second replica), and answered 422."""

    def __init__(self, settings: ServicesSettings, metrics: Any = None) -> None:
        self.s, self.metrics = settings, metrics

    async def __call__(
        self,
        what: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        retry: bool = False,
        hostile: bool = False,
        **kwargs: Any,
    ) -> Any:
        s = self.s
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(fn(*args, **kwargs), s.request_timeout_s)
            except TimeoutError:
                raise Refusal(
                    504,
                    "timeout",
                    f"the {what} service did not answer within "
                    f"{s.request_timeout_s:g} s; try again or send less",
                ) from None
            except Refusal:
                raise
            except Exception as exc:
                name = type(unwrap(exc)).__name__
                if name == "BackPressureError":
                    raise Refusal(
                        503,
                        "overloaded",
                        f"the {what} service is at capacity; retry shortly",
                        s.retry_after_s,
                    ) from None
                if name in DIED and hostile:
                    log.warning("%s replica died under a file; the file is refused, not retried", what)
                    raise Refusal(
                        422,
                        "parser_limits_exceeded",
                        f"the {what} service's replica died while processing this file: "
                        f"this file made the parser exceed its limits; it was not processed "
                        f"and is not retried. Send a smaller or simpler file",
                    ) from None
                if name in DIED and retry and attempt == 1:
                    log.warning("%s replica died under a request; retrying once", what)
                    if self.metrics is not None:
                        self.metrics.retried(what)
                    continue
                if _database_away(unwrap(exc)):  # the replica asks where its store is now (db.Database)
                    raise unavailable(
                        "store_unavailable",
                        f"the {what} service could not reach its database ({name}); retry",
                    ) from None
                if name in DIED or name == "DeploymentUnavailableError":
                    raise Refusal(
                        503,
                        "service_unavailable",
                        f"the {what} service is not available right now ({name})",
                        5,
                    ) from None
                raise
        raise AssertionError("unreachable")


@dataclass
class ApiContext:
    """What every route works with: the backends, the settings, the caller (time limit, retries, refusals) and
    the per-client rate limiter (None: no limit)."""

    backends: Backends
    settings: ServicesSettings
    call: BackendCaller
    limiter: ClientLimiter | None = None


def api_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


Api = Annotated[ApiContext, Depends(api_context)]


async def authenticated(request: Request) -> ClientIdentity:
    """The app-wide dependency: the client key (`deployments.gateway.auth`), then the client's request
    rate."""
    client = await current_client(request)
    limiter = api_context(request).limiter
    if limiter is None:
        return client
    # once per request: `EdgeForward` runs this check before the route's dependency does
    counted = getattr(request.state, "rate", None)
    if counted is None:
        try:
            limiter.hit(client)
            counted = True
        except Refusal as exc:
            counted = exc
        request.state.rate = counted
    if isinstance(counted, Refusal):
        raise counted
    return client


class GatewayMiddleware:
    """Request ids, the body-size limit before anything is read, and per-route metrics, as plain ASGI
    (Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: Any, settings: ServicesSettings, set_request_id: bool, metrics: Any) -> None:
        self.app, self.settings, self.set_request_id, self.metrics = app, settings, set_request_id, metrics
        self.limit = body_limit(app, settings.upload_max_bytes + 64 * 1024)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = (headers.get(b"x-request-id") or b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = 500
        forwarded = False

        async def send_with_id(message: Any) -> None:
            nonlocal status, forwarded
            if message["type"] == "http.response.start":
                status = message["status"]
                forwarded = any(
                    k == SERVED_BY and v.startswith(b"edge:") for k, v in message.get("headers") or []
                )
                if self.set_request_id:
                    out = list(message.get("headers") or [])
                    if not any(k.lower() == b"x-request-id" for k, _ in out):
                        out.append((b"x-request-id", rid.encode("latin-1")))
                    message = {**message, "headers": out}
            await send(message)

        # the one streamed body limit (rma_ray.bodylimit, through the kit): chunked bodies are counted as read
        await self.limit(scope, receive, send_with_id)
        if self.metrics is not None:
            # an answer an edge gave (EdgeForward) matched no route here: its path, one of the few forwarded
            route = getattr(scope.get("route"), "path", None) or (
                path_under_root(scope) if forwarded else "unmatched"
            )
            self.metrics.observe(route, scope["method"], status, (time.perf_counter() - t0) * 1000)


def owner(client: ClientIdentity) -> str:
    return client.client or f"key-{client.key_id}"


async def json_body(request: Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.body()
        data = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, "bad_json", "the body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Refusal(422, "invalid_body", validation_message(exc.errors())) from None


async def form_file(request: Request, limit: int, field: str = "file") -> FileParts:
    """The multipart file (read with a size limit) and the other form fields."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise Refusal(
            415, "multipart_required", f"send the file as multipart/form-data in a field named {field!r}"
        )
    try:
        form = await request.form(max_files=1, max_fields=20)
    except StarletteHTTPException as exc:
        raise Refusal(400, "bad_multipart", exc.detail) from None
    except Exception as exc:  # a malformed multipart body
        raise Refusal(400, "bad_multipart", f"the multipart body could not be read: {exc}") from None
    upload = form.get(field)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not isinstance(upload, UploadFile):
        raise Refusal(400, "missing_file", f"the form has no file field named {field!r}")
    data = await upload.read(limit + 1)
    await form.close()
    if len(data) > limit:
        raise Refusal(413, "file_too_large", f"the file is larger than the limit of {limit:,} bytes")
    return data, upload.filename, upload.content_type, fields


async def file_or_upload(request: Request, client: ClientIdentity, api: ApiContext) -> FileParts:
    """A request's document: a multipart `file`, or `upload_id` (form field, query or JSON) of an upload."""
    upload_id = request.query_params.get("upload_id")
    ctype = request.headers.get("content-type", "")
    if upload_id is None and ctype.startswith("application/json"):
        body = await request.body()
        try:
            upload_id = (json.loads(body) or {}).get("upload_id")
        except (ValueError, AttributeError):
            raise Refusal(400, "bad_json", "the body is not a JSON object with upload_id") from None
        if not upload_id:
            raise Refusal(422, "invalid_body", "upload_id: field required (or send a multipart file)")
    if upload_id is not None:
        if api.backends.uploads is None:  # an edge cluster's app: no uploads here, bytes in the body only
            raise Refusal(
                400,
                "upload_id_not_served_here",
                "this edge serves files sent in the request only (multipart field 'file'); "
                "an upload's id is read by the pool's gateway",
            )
        meta, data = await api.call(
            "uploads", api.backends.uploads.read, str(upload_id), owner(client), retry=True
        )
        return data, meta["filename"], meta["content_type"], {}
    return await form_file(request, api.settings.upload_max_bytes)
