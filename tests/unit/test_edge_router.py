"""The core's edge router over real HTTP: a core app behind the real key gate and `EdgeForward`, an edge app
behind the real edge gate (real Ed25519 keys, a real JWKS), a stand-in coordinator answering the edge routes;
each served by uvicorn on its own port (module-scoped: three servers, well under a second to start)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.gateway import auth, edge
from deployments.gateway.asgi import ClientKeyGate
from deployments.gateway.edge import EdgeRouter, coordinator_fetch
from deployments.gateway.edge_gate import EdgeCredentialVerifier
from deployments.gateway.keys import ClientKeyVerifier
from deployments.llm.gate import EDGE_ROUTES, OPENAI_ROUTES, SERVED
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.edges import SERVED_BY_HEADER
from tests.support import ServerThread, free_port, wait_for
from tests.support.edge import EDGE, SERVICE_CREDENTIAL, Coordinator, EdgeApp

LLM = "rma-llm"
PLAIN = credentials.mint(Kind.CLIENT)
SENSITIVE = credentials.mint(Kind.CLIENT)
KEYRING = {
    "keys": [
        {"id": PLAIN.id, "hash": PLAIN.hash, "name": "alice"},
        {"id": SENSITIVE.id, "hash": SENSITIVE.hash, "name": "bob", "sensitive": True},
    ]
}


async def core_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What the core's own replica answers (vLLM's app in the real pool)."""
    request = Request(scope, receive)
    req = json.loads(await request.body() or b"{}")
    response: Response
    if req.get("stream"):

        async def chunks() -> Any:
            yield b'data: {"core": 1}\n\n'
            yield b"data: [DONE]\n\n"

        response = StreamingResponse(chunks(), media_type="text/event-stream")
    else:
        response = JSONResponse({"served": "core", "echo": req})
    await response(scope, receive, send)


def serve_like(gate: Any) -> Any:
    """The core app as Serve hands it requests: /v1 is the route prefix (root_path); /healthz for the test."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await Starlette()(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await Response("ok")(scope, receive, send)
            return
        if scope["type"] == "http":
            scope = {**scope, "root_path": "/v1"}
        await gate(scope, receive, send)

    return app


@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[Coordinator, str]]:
    c = Coordinator()
    with ServerThread(c.app()) as server:
        yield c, server.url


@pytest.fixture(scope="module")
def edge_server(coordinator: tuple[Coordinator, str]) -> Iterator[tuple[EdgeApp, str]]:
    e = EdgeApp()
    verifier = EdgeCredentialVerifier(EDGE, coordinator[1])
    with ServerThread(e.app(verifier)) as server:
        yield e, server.url
    e.release.set()


@pytest.fixture(scope="module")
def core() -> Iterator[str]:
    gate = ClientKeyGate(
        core_app,
        prefix="/v1",
        routes=OPENAI_ROUTES,
        max_body_bytes=2**20,
        served=SERVED,
        edge_app=LLM,
        edge_routes=EDGE_ROUTES,
    )
    verifier = ClientKeyVerifier(lambda: KEYRING)
    verifier.refresh()
    auth.set_verifier(verifier)
    try:
        with ServerThread(serve_like(gate)) as server:
            yield server.url
    finally:
        auth.set_verifier(None)


@contextlib.contextmanager
def routed_by(
    coordinator: tuple[Coordinator, str], edge_server: tuple[EdgeApp, str], mode: str = "ok", **router: Any
) -> Iterator[tuple[EdgeRouter, Coordinator, EdgeApp, str]]:
    """A fresh router (breakers closed, `router`'s options) over routes that name the edge app as serving the
    LLM, the edge app in `mode`; the router is the gate's while the block runs."""
    coord, coord_url = coordinator
    app, edge_url = edge_server
    app.mode, app.seen = mode, []
    app.release.clear()
    coord.route(edge_url, {LLM: 1})
    made = EdgeRouter(coordinator_fetch(coord_url, SERVICE_CREDENTIAL), **router)
    assert made.refresh()
    edge.set_router(made)
    try:
        yield made, coord, app, edge_url
    finally:
        app.release.set()
        edge.set_router(None, disabled=True)


@pytest.fixture
def routed(
    coordinator: tuple[Coordinator, str], edge_server: tuple[EdgeApp, str], core: str
) -> Iterator[tuple[EdgeRouter, Coordinator, EdgeApp]]:
    """A fresh router (breakers closed) over routes that name the edge app as serving the LLM."""
    with routed_by(
        coordinator,
        edge_server,
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
        total_timeout_s=10.0,
        breaker_threshold=2,
        breaker_ttl_s=600,
    ) as (router, coord, app, _):
        yield router, coord, app


def chat(core: str, key: str = PLAIN.token, **body: Any) -> httpx.Response:
    return httpx.post(
        core + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
        headers={"Authorization": f"Bearer {key}", "Cookie": "session=alice", "X-Client-Name": "alice"},
        timeout=20,
    )


def test_forwarded_with_the_edge_credential_not_the_client_key(routed: Any, core: str) -> None:
    router, coord, app = routed
    r = chat(core)
    assert r.status_code == 200, r.text
    assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    assert r.json() == {
        "served": "edge",
        "echo": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    (seen,) = app.seen
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {coord.routes[0]['token']}"
    sent = json.dumps(seen["headers"]) + seen["body"].decode()
    for secret in (PLAIN.token, PLAIN.id, "alice", "session"):
        assert secret not in sent
    assert router.counts[(EDGE, LLM, "forwarded")] == 1


def test_a_stream_passes_through_as_it_comes(routed: Any, core: str) -> None:
    _, _, app = routed
    with httpx.stream(
        "POST",
        core + "/v1/chat/completions",
        json={"model": "m", "messages": [], "stream": True},
        headers={"Authorization": f"Bearer {PLAIN.token}"},
        timeout=20,
    ) as r:
        assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert first == 'data: {"chunk": 1}'  # here while the edge still holds the rest
        app.release.set()
        rest = [line for line in lines if line]
    assert rest == ['data: {"chunk": 2}', "data: [DONE]"]


def test_a_sensitive_client_stays_on_the_core(routed: Any, core: str) -> None:
    router, _, app = routed
    for _ in range(3):
        r = chat(core, SENSITIVE.token)
        assert r.status_code == 200
        assert r.headers[SERVED_BY_HEADER] == "core"
        assert r.json()["served"] == "core"
    assert app.seen == []
    assert sum(router.counts.values()) == 0


def test_edge_down_is_served_on_the_core(routed: Any, core: str) -> None:
    router, coord, _ = routed
    coord.route(f"http://127.0.0.1:{free_port()}", {LLM: 1})  # nothing listens there
    router.refresh()
    r = chat(core)
    assert r.status_code == 200
    assert r.headers[SERVED_BY_HEADER] == "core"
    assert r.json()["echo"]["messages"] == [{"role": "user", "content": "hi"}]  # the body was kept
    assert router.counts[(EDGE, LLM, "fallback")] == 1


def test_an_edge_that_does_not_answer_is_given_up_and_served_on_the_core(routed: Any, core: str) -> None:
    """A stream's headers come at once: none within the read timeout is a stuck edge (a breaker failure)."""
    router, _, app = routed
    app.mode = "hang"  # until the router's read timeout
    r = chat(core, stream=True)
    assert r.headers[SERVED_BY_HEADER] == "core"
    assert r.text.startswith('data: {"core": 1}')
    assert router.counts[(EDGE, LLM, "fallback")] == 1
    assert failures(router) == 1


def failures(router: EdgeRouter) -> int:
    breaker = asyncio.run(router.breakers.get_breaker(EDGE))
    return int(breaker.context.failure_count or 0)


def test_a_slow_non_streaming_answer_waits_past_the_read_timeout(routed: Any, core: str) -> None:
    """A non-streaming completion's headers come only after the whole generation: its first byte may take
    until the total deadline, not `read_timeout_s` (2 s here)."""
    router, _, app = routed
    app.mode = "hang"
    threading.Timer(3.0, app.release.set).start()
    r = chat(core)
    assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    assert r.json()["served"] == "edge"
    assert router.counts[(EDGE, LLM, "forwarded")] == 1 and failures(router) == 0


def test_a_non_streaming_request_past_the_deadline_is_served_on_the_core_without_a_breaker_failure(
    coordinator: tuple[Coordinator, str], edge_server: tuple[EdgeApp, str], core: str
) -> None:
    """The edge took the request and is busy: the core serves it once, and the breaker stays closed (threshold
    2, three such requests), so the edge still gets the next request."""
    with routed_by(
        coordinator, edge_server, "hang", read_timeout_s=0.5, total_timeout_s=1.0, breaker_threshold=2,
        breaker_ttl_s=600,
    ) as (router, _, app, _url):  # fmt: skip
        for _ in range(3):
            r = chat(core)
            assert r.headers[SERVED_BY_HEADER] == "core" and r.json()["served"] == "core"
        assert len(app.seen) == 3 and failures(router) == 0
        app.mode = "ok"
        assert chat(core).headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
        assert router.counts[(EDGE, LLM, "fallback")] == 3


def test_a_full_connection_pool_is_not_an_edge_failure(
    coordinator: tuple[Coordinator, str], edge_server: tuple[EdgeApp, str], core: str
) -> None:
    """No free connection in this replica's pool (httpx.PoolTimeout, 1 s) is our limit, not the edge's
    health: served on the core, the breaker stays closed. The pool is high by default (not httpx's 100)."""
    assert EdgeRouter(lambda: None).limits.max_connections == 1000
    one_connection = routed_by(
        coordinator, edge_server, breaker_threshold=2, breaker_ttl_s=600, max_connections=1
    )
    with one_connection as (router, _, app, _url):
        with httpx.stream(  # holds the only connection: the edge's stream waits for `release`
            "POST",
            core + "/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            headers={"Authorization": f"Bearer {PLAIN.token}"},
            timeout=20,
        ) as held:
            assert held.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
            for _ in range(3):  # over the breaker's threshold
                r = chat(core)
                assert r.headers[SERVED_BY_HEADER] == "core"
            assert failures(router) == 0
            app.release.set()
            held.read()
        assert chat(core).headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
        assert router.counts[(EDGE, LLM, "fallback")] == 3


@pytest.mark.parametrize("loss", ["no replica", "gone"])
def test_a_request_the_edge_holds_once_the_routes_drop_it_is_taken_back_by_the_core(
    coordinator: tuple[Coordinator, str], edge_server: tuple[EdgeApp, str], core: str, loss: str
) -> None:
    """The edge's donor died while the edge held a non-streaming request (its Serve waits for a replica that
    will not come): once the refreshed routes stop naming the edge as running the app, the core cancels the
    forward and serves the request, without a breaker failure. The total deadline here (60 s) is past the
    client's own timeout (20 s): without the withdrawal the client would time out."""
    with routed_by(
        coordinator, edge_server, "hang", read_timeout_s=2.0, total_timeout_s=60.0, breaker_threshold=1,
        breaker_ttl_s=600, withdraw_check_s=0.2,
    ) as (router, coord, app, edge_url):  # fmt: skip

        def donor_dies() -> None:
            wait_for(lambda: app.seen, timeout=10, interval=0.05, what="the edge to hold the request")
            token = coord.routes[0]["token"]
            if loss == "no replica":
                coord.route(edge_url, {LLM: 0}, token=token)
            else:
                coord.routes = []
            assert router.refresh()

        dies = threading.Thread(target=donor_dies)
        dies.start()
        r = chat(core)
        dies.join(15)
        assert r.headers[SERVED_BY_HEADER] == "core", r.headers
        assert r.json() == {
            "served": "core",
            "echo": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        }
        assert len(app.seen) == 1  # the edge had it
        assert router.counts[(EDGE, LLM, "fallback")] == 1 and failures(router) == 0
        coord.route(edge_url, {LLM: 1})  # the edge is back: used again (no breaker to wait out)
        assert router.refresh()
        app.mode = "ok"
        assert chat(core).headers[SERVED_BY_HEADER] == f"edge:{EDGE}"


def test_an_edge_whose_status_could_not_be_read_keeps_its_requests(routed: Any, core: str) -> None:
    """One failed read of the edge's Serve status (the coordinator reports it unhealthy with no apps) keeps new
    requests away but does not take back those it holds: they may be mid-generation."""
    router, coord, _ = routed
    token, url = coord.routes[0]["token"], coord.routes[0]["serve_url"]
    coord.route(url, {}, token=token, healthy=False)
    assert router.refresh()
    assert router.still_runs(EDGE, LLM)
    assert chat(core).headers[SERVED_BY_HEADER] == "core"  # a new request: not sent there
    coord.route(url, {LLM: 1}, token=token)
    assert router.refresh() and router.still_runs(EDGE, LLM)
    coord.route(url, {LLM: 0}, token=token)
    assert router.refresh() and not router.still_runs(EDGE, LLM)
    coord.routes = []
    assert router.refresh() and not router.still_runs(EDGE, LLM)


def test_failures_open_the_breaker_and_the_edge_is_skipped(routed: Any, core: str) -> None:
    router, _, app = routed
    app.mode = "fail"
    for _ in range(2):  # breaker_threshold
        r = chat(core)
        assert r.status_code == 200 and r.headers[SERVED_BY_HEADER] == "core"
    assert len(app.seen) == 2
    app.mode = "ok"
    for _ in range(3):  # open: the edge is not even tried
        assert chat(core).headers[SERVED_BY_HEADER] == "core"
    assert len(app.seen) == 2
    assert router.counts[(EDGE, LLM, "fallback")] == 2
    assert router.counts[(EDGE, LLM, "breaker_open")] == 3


def test_a_client_mistake_at_the_edge_is_passed_through(routed: Any, core: str) -> None:
    router, _, app = routed
    app.mode = "bad"
    r = chat(core)
    assert r.status_code == 400
    assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    assert r.json()["error"]["code"] == "model_not_found"
    for _ in range(3):  # not the edge's fault: the breaker stays closed
        chat(core)
    assert len(app.seen) == 4


def test_a_refused_edge_credential_falls_back_and_refetches_the_routes(routed: Any, core: str) -> None:
    router, coord, app = routed
    coord.route(coord.routes[0]["serve_url"], {LLM: 1}, token="not-a-jwt")
    router.refresh()
    r = chat(core)
    assert r.status_code == 200 and r.headers[SERVED_BY_HEADER] == "core"
    assert app.seen == []  # the edge gate refused it before the app
    assert router._wake.is_set()  # the routes are fetched again now, not in 30 s


def test_a_stream_cut_at_the_edge_ends_the_clients_stream(routed: Any, core: str) -> None:
    router, _, app = routed
    app.mode = "cut"
    with pytest.raises(httpx.HTTPError):
        with httpx.stream(
            "POST",
            core + "/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            headers={"Authorization": f"Bearer {PLAIN.token}"},
            timeout=20,
        ) as r:
            assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
            list(r.iter_lines())
    assert router.counts[(EDGE, LLM, "broken")] == 1


def test_no_edge_serving_the_app_or_no_routes_means_the_core(routed: Any, core: str) -> None:
    router, coord, app = routed
    coord.route(coord.routes[0]["serve_url"], {"rma-embeddings": 1})  # the edge runs no LLM
    router.refresh()
    assert chat(core).headers[SERVED_BY_HEADER] == "core"
    coord.route(coord.routes[0]["serve_url"], {LLM: 1}, healthy=False)
    router.refresh()
    assert chat(core).headers[SERVED_BY_HEADER] == "core"
    assert app.seen == []


def test_a_body_over_the_forward_limit_is_served_on_the_core(routed: Any, core: str) -> None:
    router, _, app = routed
    r = chat(core, padding="x" * (2**20 + 10))  # over the gate's 1 MiB: the core's own limit answers
    assert r.status_code == 413
    assert app.seen == [] and sum(router.counts.values()) == 0


def test_no_router_keeps_todays_answer(routed: Any, core: str) -> None:
    edge.set_router(None, disabled=True)  # a pool with no edge routing (RMA_EDGE_ROUTING=off, no identity)
    r = chat(core)
    assert r.status_code == 200 and r.json()["served"] == "core"
    assert SERVED_BY_HEADER not in r.headers


def test_the_key_check_still_comes_first(routed: Any, core: str) -> None:
    _, _, app = routed
    r = chat(core, "rma_client_nope_" + "0" * 64)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert app.seen == []


def test_routes_that_cannot_be_read_are_served_on_the_core(core: str) -> None:
    def down() -> Any:
        raise ConnectionError("coordinator down")

    router = EdgeRouter(down)
    assert router.refresh() is False
    edge.set_router(router)
    try:
        r = chat(core)
        assert r.status_code == 200 and r.json()["served"] == "core"
        assert SERVED_BY_HEADER not in r.headers  # no edge known: the answer is exactly today's
    finally:
        edge.set_router(None, disabled=True)


def test_credentials_are_refetched_before_they_expire(coordinator: tuple[Coordinator, str]) -> None:
    coord, url = coordinator
    coord.route("http://127.0.0.1:1", {LLM: 1})
    router = EdgeRouter(coordinator_fetch(url, SERVICE_CREDENTIAL), refresh_s=30)
    router.refresh()
    assert router.next_refresh_s() == 30  # 600 s credential: the periodic fetch comes first
    coord.routes[0]["expires_at"] = (datetime.now(UTC) + timedelta(seconds=75)).isoformat()
    router.refresh()
    assert 1.0 <= router.next_refresh_s() <= 15.0  # the margin ahead of its expiry, not 30 s
    coord.routes[0]["expires_at"] = (datetime.now(UTC) + timedelta(seconds=10)).isoformat()
    router.refresh()
    assert router.next_refresh_s() == 1.0  # within the margin: fetch again at once
    assert router.candidates(LLM) == [router.routes()[0]]  # still valid for a few seconds
