"""The spot-check loop end to end (issue 20), no Ray: a real coordinator (in process, SQLite) with one edge;
a core app behind the real `EdgeForward`, whose `EdgeRouter` fetches its routes from that coordinator with
a service credential and whose `SpotChecker` reports its verdicts there (the gateway's own reporter, through
`AdmissionClient`); an edge behind the real edge gate (verifying the coordinator's credential against its
JWKS), honest or not, which also answers the edge's Serve status as its dashboard would. A dishonest edge is
quarantined after the minimum number of checks, the core then serves its share, and an admin's trust routes
it again; an honest edge over as many requests stays routed at a pass rate of 1.0; a streamed answer is
checked too. Module-scoped: three uvicorn servers (~1 s)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from admission.main import build_state, create_app, prepare_database
from deployments.gateway import auth, edge, quota, spotcheck
from deployments.gateway.edge import EdgeForward, EdgeRouter, coordinator_fetch
from deployments.gateway.edge_gate import EdgeCredentialVerifier
from deployments.gateway.keys import ClientKeyVerifier
from deployments.gateway.spotcheck import SpotChecker
from rma_ray.edges import SERVED_BY_HEADER, EdgeEndpoint
from tests.integration.conftest import Coordinator, make_settings
from tests.support import ServerThread, free_port, wait_for
from tests.support.edge import EDGE
from tests.unit.test_spot_checks import (
    APP,
    GARBAGE_REPLY,
    KEYRING,
    PLAIN,
    ROUTES,
    Core,
    Edge,
    embeddings_answer,
    events,
)

MIN_CHECKS, BELOW = 3, 0.8
BOUND = 10  # requests a dishonest edge may answer before the coordinator must have quarantined it


@dataclass
class Loop:
    pool: Coordinator
    edge: Edge
    core: Core
    core_url: str
    router: EdgeRouter
    credential_file: Path

    def view(self) -> dict[str, Any]:
        r = self.pool.admin("GET", "/api/admin/spot-checks", params={"failures": 3})
        assert r.status_code == 200, r.text
        (view,) = r.json()["edges"]
        return view  # type: ignore[no-any-return]

    def post(self, word: str) -> httpx.Response:
        r = httpx.post(
            self.core_url + "/v1/embeddings",
            json={"model": "e", "input": [word]},
            headers={"Authorization": f"Bearer {PLAIN.token}"},
            timeout=20,
        )
        assert r.status_code == 200, r.text
        return r

    def checked(self, n: int) -> dict[str, Any]:
        """The coordinator's view once it holds `n` verdicts (the checker reports after the client's answer)."""
        return wait_for(
            lambda: (v := self.view())["checks"] >= n and v,
            timeout=10,
            what=f"{n} verdict(s) at the coordinator",
        )


def dashboard(request: Request) -> JSONResponse:
    """The edge's Serve status, shaped as Ray's dashboard answers it: APP with one running replica."""
    replicas = [{"state": "RUNNING"}]
    return JSONResponse(
        {"applications": {APP: {"status": "RUNNING", "deployments": {"d": {"replicas": replicas}}}}}
    )


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    tmp = tmp_path_factory.mktemp("spot-loop")
    (tmp / "edge-token").write_text("edge-token-" + "e" * 40)
    edge_port = free_port()
    edge_url = f"http://127.0.0.1:{edge_port}"
    endpoint = EdgeEndpoint(
        name=EDGE,
        ray_address="127.0.0.1:9",  # never asked: no donor registers here
        dashboard_url=edge_url,
        serve_url=edge_url,
        token_file=tmp / "edge-token",
    )
    settings = make_settings(
        f"sqlite:///{tmp / 'coordinator.db'}",
        tmp / "data",
        edges=[endpoint],
        spot_check_rate=1.0,
        spot_check_min_checks=MIN_CHECKS,
        spot_check_quarantine_below=BELOW,
    )
    state = build_state(settings)
    admin_key = prepare_database(state)
    assert admin_key
    edge_app, core = Edge(), Core()
    core.gate.set()
    verifier = ClientKeyVerifier(lambda: KEYRING)
    verifier.refresh()
    forward = EdgeForward(core.app(), app_name=APP, routes=ROUTES)

    async def core_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or scope.get("path") == "/healthz":
            await Starlette(routes=[Route("/healthz", lambda r: PlainTextResponse("ok"))])(
                scope, receive, send
            )
        else:
            await forward(scope, receive, send)

    try:
        with (
            ServerThread(create_app(state=state)) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            pool = Coordinator(server.url, admin_key, state, http)
            r = pool.admin("POST", "/api/admin/service-keys", json={"name": "gateway"})
            assert r.status_code in (200, 201), r.text
            credential = r.json()["key"]
            (tmp / "service-credential").write_text(credential)
            gated = edge_app.app(EdgeCredentialVerifier(EDGE, server.url))

            async def edge_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
                if scope.get("path") == "/api/serve/applications/":
                    await Starlette(routes=[Route("/api/serve/applications/", dashboard)])(
                        scope, receive, send
                    )
                else:
                    await gated(scope, receive, send)

            with ServerThread(edge_server, port=edge_port), ServerThread(core_server) as core_srv:
                # not started: the tests refresh it, no timer does
                router = EdgeRouter(coordinator_fetch(server.url, credential))
                auth.set_verifier(verifier)
                quota.set_meter(quota.Meter(None))
                edge.set_router(router)
                yield Loop(pool, edge_app, core, core_srv.url, router, tmp / "service-credential")
    finally:
        edge.set_router(None, disabled=True)
        spotcheck.set_checker(None)
        auth.set_verifier(None)
        quota.set_meter(None)
        state.engine.dispose()


@pytest.fixture
def fresh(loop: Loop, monkeypatch: pytest.MonkeyPatch) -> Loop:
    """The edge trusted (its pass rate anew), routed, honest; a new checker with the gateway's own reporter,
    which reads the gateway's identity as a core replica does."""
    monkeypatch.setenv("RMA_COORDINATOR_URL", loop.pool.url)
    monkeypatch.setenv("RMA_KEYRING_CREDENTIAL_FILE", str(loop.credential_file))
    r = loop.pool.admin("POST", f"/api/admin/edges/{EDGE}/trust")
    assert r.status_code == 200, r.text
    assert loop.router.refresh() and [e.name for e in loop.router.routes()] == [EDGE]
    assert loop.router.spot_check_rate == 1.0
    spotcheck.set_checker(SpotChecker())
    loop.edge.honest = True
    return loop


def quarantine(loop: Loop) -> int:
    """Requests to a dishonest edge, each answered by it with its own answer, until the coordinator has
    quarantined it (at most BOUND); the number it took."""
    loop.edge.honest = False
    for n in range(1, BOUND + 1):
        r = loop.post(f"word {n}")
        assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
        assert r.json() == embeddings_answer([f"word {n}"], seed=1)  # the edge's answer, as it sent it
        if loop.checked(n)["quarantined"]:
            return n
    raise AssertionError(f"not quarantined after {BOUND} failing checks: {loop.view()}")


def test_a_dishonest_edge_is_quarantined_then_the_core_serves_until_trusted(fresh: Loop) -> None:
    taken = quarantine(fresh)
    print(f"\nspot-check loop: a dishonest edge was quarantined after {taken} request(s) (rate 1.0)")
    assert taken == MIN_CHECKS  # every check failed: quarantined as soon as it had the minimum
    view = fresh.view()
    assert view["pass_rate"] == 0.0 and view["since"]
    assert f"{MIN_CHECKS} of {MIN_CHECKS} checks failed" in view["reason"], view["reason"]
    assert view["failures"] == MIN_CHECKS and len(view["recent_failures"]) == MIN_CHECKS
    newest = view["recent_failures"][0]
    assert newest["kind"] == "embeddings" and newest["reporter"].startswith("service:")
    assert json.loads(newest["sample"]["edge_answer"]) == embeddings_answer([f"word {taken}"], seed=1)

    # the router's next refresh leaves the edge out: the core answers, honestly (the client's request, not a
    # re-run; the header: see test_the_core_says_it_served_while_its_only_edge_is_quarantined)
    assert fresh.router.refresh() and fresh.router.routes() == []
    fresh.core.calls.clear()
    r = fresh.post("after")
    assert r.json() == embeddings_answer(["after"])
    assert r.headers.get(SERVED_BY_HEADER) != f"edge:{EDGE}"
    (call,) = fresh.core.calls
    assert call["client"] == PLAIN.id and not call["scope"].get(quota.SPOT_CHECK)

    # an admin's trust routes it again
    r = fresh.pool.admin("POST", f"/api/admin/edges/{EDGE}/trust")
    assert r.status_code == 200 and not r.json()["quarantined"], r.text
    assert fresh.router.refresh() and [e.name for e in fresh.router.routes()] == [EDGE]
    assert fresh.post("again").headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    # still checked, and counted from nothing: one failure is no verdict before the minimum
    view = fresh.checked(1)
    assert (view["checks"], view["failures"], view["quarantined"]) == (1, 1, False), view


def test_an_honest_edge_over_as_many_requests_stays_routed(fresh: Loop) -> None:
    for n in range(1, BOUND + 1):
        r = fresh.post(f"word {n}")
        assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
        assert r.json() == embeddings_answer([f"word {n}"])
    view = fresh.checked(BOUND)
    assert view["checks"] == BOUND and view["pass_rate"] == 1.0 and not view["quarantined"], view
    assert view["failures"] == 0
    assert fresh.router.refresh() and [e.name for e in fresh.router.routes()] == [EDGE]


def test_the_core_says_it_served_while_its_only_edge_is_quarantined(fresh: Loop) -> None:
    quarantine(fresh)
    assert fresh.router.refresh() and fresh.router.routes() == []
    assert fresh.post("after").headers.get(SERVED_BY_HEADER) == "core"


def test_a_dishonest_edge_is_caught_on_a_streamed_answer(fresh: Loop) -> None:
    fresh.edge.honest = False
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}], "stream": True}
    r = httpx.post(
        fresh.core_url + "/v1/chat/completions",
        json=chat,
        headers={"Authorization": f"Bearer {PLAIN.token}"},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    assert r.content == b"".join(events(GARBAGE_REPLY, chat=True))  # the edge's events, as it sent them
    view = fresh.checked(1)
    assert (view["checks"], view["failures"]) == (1, 1), view
    failure = view["recent_failures"][0]  # the newest
    assert failure["kind"] == "llm"
    # the sample shows the answer put back together
    assert json.loads(failure["sample"]["edge_answer"])["choices"][0]["message"]["content"] == GARBAGE_REPLY
