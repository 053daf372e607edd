"""The core's side of edge clusters (DESIGN.md, "Trust domains"): after the client-key check, a request that
an edge can serve is sent there over HTTP, and served by the core's own replicas when it cannot.

- `EdgeRouter` (one per replica process): the edges as the coordinator reports them (`POST
  /api/service/edge-routes` with this node's identity: each edge's Serve URL, a short-lived edge credential,
  its running replicas per app and its health), refreshed every `refresh_s` (10 s: new edge capacity is used
  within that) and before a credential expires;
  a circuit breaker per edge (`purgatory`: asyncio-native, in-memory, a failure threshold and a time to
  half-open, no thread or lock of ours); the forward itself with httpx, streamed both ways.
- `EdgeForward`: ASGI middleware in front of an app's forwardable routes (the LLM's completions, embeddings,
  the services' OCR and parsing of a file sent in the body).
  It takes the client the key check found (or runs the check; a refused request goes on to the app, which
  refuses it in its own shape), and for a client that is not `sensitive`, when an edge reports running
  replicas of the app and its breaker is closed, forwards the request; else the app serves it (`core`).

What reaches an edge: the method, the path, the body and a few content headers, with `Authorization: Bearer
<edge credential>`; never the client's key, cookies or any header naming the client. Where the pool has an edge,
every answer of a routed path says who served it (`SERVED_BY_HEADER`: `edge:<name>` or `core`); with no edge
(none configured, or the routes cannot be read) the app answers exactly as it always has.

Never a hang: connect within `connect_timeout_s`, the whole forward within `total_timeout_s`; each read within
`read_timeout_s`, but for a request whose JSON body does not ask `"stream": true` the first byte may take
until the total deadline (a non-streaming completion sends its headers only once the whole generation is done:
a slow but healthy edge is not given up after `read_timeout_s`). A failure before the answer's first byte
(connect error, a stream's first byte not within `read_timeout_s`, a 5xx, or a 401/403: the credential was
refused, so the routes are fetched again at once) counts against the edge's breaker and the request is served
on the core, once: the body was kept, and the routed calls (completions, embeddings, OCR, parsing) change
nothing but the compute they cost, so this is safe. Three failures before the first byte do not count against
the edge's breaker (they are served on the core all the same): a non-streaming request still unanswered at the
total deadline (the edge took it and is busy: opening the breaker would move all the load to the core just when
the edge is loaded), no free connection in this replica's own pool (`httpx.PoolTimeout`: our limit, not the
edge's health), and a request still unanswered when the refreshed routes drop the edge or report it with no
running replica of the app (checked every `withdraw_check_s`: its donor died, and the edge's Serve would hold
the request until a replica comes back; the routes already keep new requests away). An edge's 4xx is the
client's mistake and is passed through. A failure after the first byte ends the client's stream (the
connection is closed: a cut answer never looks complete).

Counters (Ray's metrics, and `EdgeRouter.counts` in the process): `rma_edge_requests{edge, app, outcome}`
with outcome `forwarded` (the edge answered), `fallback` (the edge failed before answering; the core served it),
`breaker_open` (the edge failed lately and was not tried; the core served it) or `broken` (the edge's answer
was cut).

Spot-checks (`deployments.gateway.spotcheck`): a fraction of the edge's complete answers, streamed or not (the
routes' `spot_check_rate`), is copied while relayed and re-checked on the core after the client has it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse

from deployments.gateway.edge_gate import Counter
from deployments.gateway.keys import ClientIdentity
from deployments.gateway.refusal import Refusal
from deployments.gateway.spotcheck import sampler
from deployments.gateway.spotcheck import streaming as _streaming
from rma_ray.edges import SERVED_BY_HEADER
from rma_ray.upstream import UPSTREAM_HEADER
from rma_ray.wire import EdgeRoute, EdgeRoutes

log = logging.getLogger("rma.edge_router")

ROUTES_PATH = "/api/service/edge-routes"
ROUTING_ENV = "RMA_EDGE_ROUTING"  # "off": this replica never forwards (the edge apps themselves, tests)
EXPIRY_MARGIN_S = 60.0  # fetch new credentials this long before the current ones expire
MIN_VALID_S = 5.0  # a credential closer than this to its expiry is not used
# what of the client's request goes to the edge: content headers only (a request id is a random id)
FORWARDED_HEADERS = frozenset({"content-type", "accept", "x-request-id"})
# what of the edge's answer goes back to the client
RETURNED_HEADERS = frozenset(
    {"content-type", "cache-control", "retry-after", "x-request-id", "x-accel-buffering"}
)

Route = tuple[str, "re.Pattern[str]"]  # (method, full request path)


class EdgeAnswer(StreamingResponse):
    """An edge's answer as relayed to the client, and where the edge head's HAProxy forwarded the request
    (`upstream`, its x-rma-upstream: rma_ray.upstream): kept for a spot-check's attribution, never sent on."""

    upstream: str | None = None


def serves(route: EdgeRoute, app: str, now: float) -> bool:
    """Whether `route`'s edge takes `app` now: healthy, running replicas of the app, a credential not about to
    expire."""
    return route.healthy and route.apps.get(app, 0) > 0 and route.expires_at.timestamp() - now > MIN_VALID_S


def parse_routes(data: Any) -> EdgeRoutes:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return EdgeRoutes.model_validate(data)


def coordinator_fetch(url: str, credential: str, timeout: float = 5.0) -> Callable[[], Any]:
    """The routes as the coordinator answers them to this node (`POST /api/service/edge-routes`)."""
    from rma_ray.client import AdmissionClient

    client = AdmissionClient(url, credential, timeout=timeout)
    return lambda: client.request("POST", ROUTES_PATH)


class EdgeFailed(Exception):
    """The edge answered, but not with something to pass on (a 5xx; a 401/403 to the gateway's credential)."""

    def __init__(self, edge: str, status: int) -> None:
        super().__init__(f"edge {edge} answered {status}")
        self.status = status


class EdgeBusy(Exception):
    """Not the edge's fault (no breaker failure, see the module's doc): a non-streaming request it took and
    had not answered by the total deadline, or no free connection in this replica's pool."""


class EdgeWithdrawn(Exception):
    """The routes stopped naming the edge as running the app while a request to it had no answer yet (its
    donor died: the edge's Serve holds such a request until a replica comes back, or for ever). Not a breaker
    failure: the routes already keep new requests away, and the edge is used again as soon as they name it."""

    def __init__(self, edge: str, app: str) -> None:
        super().__init__(f"edge {edge} no longer runs {app}")


class EdgeRouter:
    """The edges this replica may forward to, their breakers and the forward itself."""

    def __init__(
        self,
        fetch: Callable[[], Any],
        *,
        refresh_s: float = 10.0,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 60.0,
        total_timeout_s: float = 170.0,  # under Serve's 180 s request limit
        breaker_threshold: int = 3,
        breaker_ttl_s: float = 15.0,
        withdraw_check_s: float = 1.0,
        max_connections: int = 1000,  # per replica process and event loop, all edges together
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self.refresh_s = refresh_s
        self.timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=10.0, pool=1.0)
        # a non-streaming request's first byte may take until the total deadline (asyncio.timeout_at ends it)
        self.slow_timeout = httpx.Timeout(
            connect=connect_timeout_s, read=total_timeout_s, write=10.0, pool=1.0
        )
        # httpx's default pool (100 connections, 1 s to get one) would refuse requests exactly when the edge
        # should absorb load; a high bound still keeps a runaway from opening sockets without end
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=100)
        self.total_timeout_s = total_timeout_s
        self.withdraw_check_s = withdraw_check_s
        from purgatory import AsyncCircuitBreakerFactory  # here: a node without it serves on the core

        # a request the client gave up on (its task cancelled) says nothing about the edge, nor does EdgeBusy
        # (purgatory ends an excluded exception's request as a success: the edge did take the request)
        self.breakers = AsyncCircuitBreakerFactory(
            default_threshold=breaker_threshold,
            default_ttl=breaker_ttl_s,
            exclude=[asyncio.CancelledError, EdgeBusy, EdgeWithdrawn],
        )
        self._clock = clock
        self._routes = EdgeRoutes(edges=[])
        self._failed_before = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self.counter = Counter(
            "rma_edge_requests",
            "requests the core's gateway meant for an edge cluster, by outcome "
            "(forwarded, fallback, breaker_open, broken)",
            ("edge", "app", "outcome"),
        )

    @property
    def counts(self) -> collections.Counter[tuple[str, ...]]:
        return self.counter.counts

    # -- the routes --------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Fetch the routes now (blocking). On failure the last routes stay (each credential until it
        expires); the first failure is logged as a warning, later ones at debug level."""
        try:
            routes = parse_routes(self._fetch())
        except Exception as exc:
            level = logging.DEBUG if self._failed_before else logging.WARNING
            log.log(level, "edge routes unavailable (requests are served on the core): %s", str(exc)[:300])
            self._failed_before = True
            return False
        self._routes, self._failed_before = routes, False
        return True

    def routes(self) -> list[EdgeRoute]:
        return list(self._routes.edges)

    def has_edges(self) -> bool:
        """The pool has edges: some routed, or every one quarantined (the core then says it served)."""
        return bool(self._routes.edges or self._routes.quarantined)

    @property
    def spot_check_rate(self) -> float:
        """The fraction of edge answers the core re-checks (the coordinator's, with the routes; 0 = off)."""
        return self._routes.spot_check_rate

    def next_refresh_s(self) -> float:
        """Seconds until the next fetch: `refresh_s`, or sooner when a credential nears its expiry."""
        now = self._clock()
        soonest = min(
            (r.expires_at.timestamp() - EXPIRY_MARGIN_S - now for r in self._routes.edges),
            default=self.refresh_s,
        )
        return max(1.0, min(self.refresh_s, soonest))

    def start(self) -> EdgeRouter:
        self._thread = threading.Thread(target=self._loop, name="rma-edge-routes", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def refresh_soon(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self.next_refresh_s())
            self._wake.clear()

    def still_runs(self, edge: str, app: str) -> bool:
        """False once the latest routes drop `edge`, or name it answering with no running replica of `app` (its
        donor died). An edge whose Serve status could not be read (`healthy` false: one slow dashboard call) is
        given the benefit of the doubt: its requests may be mid-generation. The credential's expiry does not
        matter here: a request already sent was accepted with it."""
        route = next((r for r in self._routes.edges if r.name == edge), None)
        return route is not None and (not route.healthy or route.apps.get(app, 0) > 0)

    def candidates(self, app: str) -> list[EdgeRoute]:
        """The edges that report running replicas of `app`, are healthy and hold a valid credential."""
        now = self._clock()
        return [r for r in self._routes.edges if serves(r, app, now)]

    # -- the forward -------------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._http.get(loop)
        if client is None:
            client = self._http[loop] = httpx.AsyncClient(
                timeout=self.timeout, limits=self.limits, follow_redirects=False
            )
        return client

    async def open(
        self,
        app: str,
        method: str,
        path: str,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> StreamingResponse | None:
        """The edge's answer to this request, streaming (its status and headers received), or None: no edge
        can take it now, or the one tried failed before answering (the caller serves it on the core)."""
        from purgatory.domain.model import OpenedState

        streaming = _streaming(body)
        timeout = self.timeout if streaming else self.slow_timeout
        for route in self.candidates(app):
            breaker = await self.breakers.get_breaker(route.name)
            deadline = asyncio.get_running_loop().time() + self.total_timeout_s
            try:
                async with breaker:
                    try:
                        async with asyncio.timeout_at(deadline):
                            resp = await self._unless_withdrawn(
                                route.name,
                                app,
                                self._send(route, method, path, query, headers, body, timeout),
                            )
                    except httpx.PoolTimeout as exc:  # our own pool is full: not the edge's health
                        raise EdgeBusy(f"no free connection to edge {route.name}") from exc
                    except (httpx.ReadTimeout, TimeoutError) as exc:
                        if streaming:  # a stream's headers come at once: an edge that sends none is stuck
                            raise
                        # the edge took the whole request and is still generating at the deadline: the core
                        # serves it (once), but this is load, not a fault, so the breaker stays as it is
                        raise EdgeBusy(f"edge {route.name} had not answered by the deadline") from exc
                    if resp.status_code >= 500 or resp.status_code in (401, 403):
                        await resp.aclose()
                        raise EdgeFailed(route.name, resp.status_code)
            except OpenedState:
                self.counter.inc(route.name, app, "breaker_open")
                continue  # this edge failed lately: the next one, or the core
            except Exception as exc:  # anything before the first byte: the core serves it (the body is kept)
                status = getattr(exc, "status", None)
                if status in (401, 403):  # the credential was refused: rotated? fetch the routes again
                    self.refresh_soon()
                log.warning("edge %s failed before answering (%s); served on the core", route.name, _why(exc))
                self.counter.inc(route.name, app, "fallback")
                return None
            self.counter.inc(route.name, app, "forwarded")
            out = {k: v for k, v in resp.headers.items() if k.lower() in RETURNED_HEADERS}
            out[SERVED_BY_HEADER] = f"edge:{route.name}"
            answer = EdgeAnswer(
                self._relay(route.name, app, resp, deadline), status_code=resp.status_code, headers=out
            )
            answer.upstream = resp.headers.get(UPSTREAM_HEADER)
            return answer
        return None

    async def _unless_withdrawn(
        self, edge: str, app: str, sending: Awaitable[httpx.Response]
    ) -> httpx.Response:
        """The edge's answer (status and headers), or EdgeWithdrawn once the routes, refreshed meanwhile, no
        longer name the edge as running `app`: the request is cancelled there and the core serves it. Checked
        every `withdraw_check_s` until the answer's first byte."""
        send = asyncio.ensure_future(sending)
        answered = False
        try:
            while True:
                done, _ = await asyncio.wait({send}, timeout=self.withdraw_check_s)
                if done:
                    answered = True
                    return send.result()
                if not self.still_runs(edge, app):
                    raise EdgeWithdrawn(edge, app)
        finally:
            if not send.done():
                send.cancel()
            elif not answered and not send.cancelled() and send.exception() is None:
                # it answered in the very turn this wait was cancelled (the client left, the deadline): unread
                asyncio.ensure_future(send.result().aclose())

    async def _send(
        self,
        route: EdgeRoute,
        method: str,
        path: str,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        sent = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() in _FORWARDED_B}
        sent["authorization"] = f"Bearer {route.token}"
        sent["accept-encoding"] = "identity"  # the bytes are passed on as they come
        url = route.serve_url.rstrip("/") + path + (f"?{query.decode('latin-1')}" if query else "")
        client = self._client()
        request = client.build_request(
            method, url, headers=sent, content=body, timeout=timeout or self.timeout
        )
        return await client.send(request, stream=True)

    async def _relay(
        self, edge: str, app: str, resp: httpx.Response, deadline: float
    ) -> AsyncIterator[bytes]:
        chunks = resp.aiter_raw()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                yield chunk
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("edge %s: the answer was cut (%s); the client's stream ends", edge, _why(exc))
            self.counter.inc(edge, app, "broken")
            raise
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        for client in self._http.values():
            await client.aclose()
        self._http.clear()


_FORWARDED_B = frozenset(h.encode() for h in FORWARDED_HEADERS)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__


# -- the process's router ------------------------------------------------------------------------------------

_lock = threading.Lock()
_router: EdgeRouter | None = None
_disabled = False


def _build() -> EdgeRouter | None:
    from deployments.gateway import edge_gate
    from deployments.gateway.auth import coordinator_identity

    if os.environ.get(ROUTING_ENV, "").lower() in ("off", "0", "false") or edge_gate.edge_mode() is not None:
        return None
    try:
        url, credential = coordinator_identity()
        return EdgeRouter(coordinator_fetch(url, credential)).start()
    except (
        Exception
    ) as exc:  # no identity on this node, or no breaker library (`pip install rma-pool[services]`)
        log.warning("no edge routing on this replica (requests are served on the core): %s", str(exc)[:300])
        return None


def router() -> EdgeRouter | None:
    """This process's router (built once, lazily; its first fetch runs in the background, so the first
    requests are served on the core), or None where it does not route."""
    global _router, _disabled
    with _lock:
        if _router is None and not _disabled:
            _router = _build()
            _disabled = _router is None
        return _router


def set_router(r: EdgeRouter | None, disabled: bool = False) -> None:
    """For tests outside Serve: route with `r` (None and not disabled: back to building from the node)."""
    global _router, _disabled
    with _lock:
        _router, _disabled = r, disabled


async def _ready_router() -> EdgeRouter | None:
    if _router is not None or _disabled:
        return _router
    return await asyncio.to_thread(router)


# -- the middleware ------------------------------------------------------------------------------------------


class EdgeForward:
    """ASGI middleware: `routes` (method, full path) of Serve app `app_name` go to an edge when one serves the
    app, else to `app`; other requests go to `app` untouched. Place it after the client-key check (it reads
    the client the check found, or runs it). Bodies over `max_body_bytes` are served on the core.

    `forwardable(scope)`: whether a routed request may leave the core at all (the services' OCR and parse
    routes: only a file in the body, never an upload's id, whose bytes only the core reads); False: the core
    serves it. `check(request)`: the app's own client check (the key, and e.g. the per-client rate) instead
    of the key check alone; its Refusal sends the request on to the app, which refuses it in its own shape."""

    def __init__(
        self,
        app: Any,
        *,
        app_name: str,
        routes: Sequence[Route],
        max_body_bytes: int = 16 * 2**20,
        forwardable: Callable[[dict[str, Any]], bool] | None = None,
        check: Callable[[Request], Awaitable[ClientIdentity]] | None = None,
    ):
        self.app, self.app_name, self.routes, self.max_body_bytes = (
            app,
            app_name,
            tuple(routes),
            max_body_bytes,
        )
        self.forwardable, self.check = forwardable, check

    def _routed(self, scope: dict[str, Any]) -> bool:
        return any(m == scope["method"] and p.fullmatch(scope["path"]) for m, p in self.routes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._routed(scope):
            await self.app(scope, receive, send)
            return
        r = await _ready_router()
        if r is None or not r.has_edges():  # no edge (none configured, or the routes unreadable): as before
            await self.app(scope, receive, send)
            return
        if not r.candidates(self.app_name) or (self.forwardable is not None and not self.forwardable(scope)):
            # no edge serves the app now, or this request may not leave the core: no key check, no body read
            await self.app(scope, receive, _served_by_core(send))
            return
        client = await _client_of(scope, self.check)
        if client is None or client.sensitive:
            await self.app(scope, receive, _served_by_core(send))
            return
        body, more = await _read_body(receive, self.max_body_bytes)
        if not more:
            resp = await r.open(
                self.app_name,
                scope["method"],
                scope["path"],
                scope.get("query_string", b""),
                scope["headers"],
                body,
            )
            if resp is not None:
                # a sampled answer is copied as it is relayed and re-checked on the core once it was sent
                tee = sampler(
                    r.spot_check_rate,
                    self.app_name,
                    self.app,
                    scope,
                    body,
                    resp.headers,
                    send,
                    upstream=getattr(resp, "upstream", None),
                )
                await resp(scope, receive, send if tee is None else tee.send)
                if tee is not None:
                    tee.done()
                return
        await self.app(scope, _replay(body, more, receive), _served_by_core(send))


async def _client_of(
    scope: dict[str, Any], check: Callable[[Request], Awaitable[ClientIdentity]] | None = None
) -> ClientIdentity | None:
    """The client the key check (`check`, default the key check alone) found for this request (runs it when
    no check ran yet); None when refused: the app behind refuses it in its own shape."""
    from deployments.gateway.auth import current_client

    try:
        return await (check or current_client)(Request(scope))
    except Refusal:
        return None


async def _read_body(receive: Any, limit: int) -> tuple[bytes, bool]:
    """The request body, up to `limit` bytes; `more` when the body goes on past it (not read further)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left
            return b"".join(parts), False
        chunk = message.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            return b"".join(parts), False
        if size > limit:
            return b"".join(parts), True


def _replay(body: bytes, more: bool, receive: Any) -> Any:
    """A `receive` that gives the body read already, then whatever the client still sends."""
    done = False

    async def replay() -> Any:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()  # the rest of a long body, or http.disconnect when the client leaves

    return replay


def _served_by_core(send: Any) -> Any:
    async def tagged(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (SERVED_BY_HEADER.encode(), b"core")]
            message = {**message, "headers": headers}
        await send(message)

    return tagged
