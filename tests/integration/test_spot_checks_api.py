"""Spot-checks of edge answers on a real coordinator (issue 20): the core gateway's verdicts
(`POST /api/service/spot-checks`) move the edge's decayed pass rate; under the threshold, after the minimum
number of checks, the edge is quarantined (gone from the edge routes, audited, on the registry page, its
failing samples kept and bounded) until an admin trusts it again. A coordinator served in this process with
one edge whose "GCS" is a listening socket (registration only checks that it answers; ~0.3 s on SQLite,
~1 s on PostgreSQL); no Ray is started."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from admission.models import EdgeReputation, SpotCheck, Worker, utcnow
from admission.services.reputation import Tally, add
from rma_ray import credentials
from rma_ray.cli import app as rma_app
from tests.integration.conftest import Coordinator, make_settings, one_edge, serve

MIN_CHECKS, HALF_LIFE, BELOW, KEPT, RATE = 5, 10.0, 0.8, 3, 0.05


@pytest.fixture
def pool(db_url: str, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator with one edge ("edge"; untrusted invites join it) and small spot-check settings."""
    with one_edge(tmp_path) as edge:
        settings = make_settings(
            db_url,
            tmp_path / "data",
            edges=[edge],
            spot_check_rate=RATE,
            spot_check_min_checks=MIN_CHECKS,
            spot_check_half_life=HALF_LIFE,
            spot_check_quarantine_below=BELOW,
            spot_check_samples_kept=KEPT,
        )
        with serve(settings) as c:
            yield c


def verdict(passed: bool, n: int = 0, **over: Any) -> dict[str, Any]:
    return {
        "edge": "edge",
        "app": "llm",
        "kind": "llm",
        "path": "/v1/chat/completions",
        "passed": passed,
        "score": -0.4 if passed else -6.5,
        "threshold": -2.0,
        "request_sha256": hashlib.sha256(str(n).encode()).hexdigest(),
        "sample": None if passed else {"request": f"prompt {n}", "edge": "garbage", "core": "an answer"},
        **over,
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def routed(pool: Coordinator, cred: str) -> tuple[set[str], float]:
    r = pool.http.post("/api/service/edge-routes", headers=bearer(cred))
    assert r.status_code == 200, r.text
    return {e["name"] for e in r.json()["edges"]}, r.json()["spot_check_rate"]


def rma(pool: Coordinator, *args: str) -> tuple[int, str]:
    env = {"RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.admin_key, "COLUMNS": "300"}
    r = CliRunner().invoke(rma_app, list(args), env=env)
    return r.exit_code, r.output + (str(r.exception) if r.exception else "")


def edge_view(pool: Coordinator, failures: int = 5) -> dict[str, Any]:
    r = pool.admin("GET", "/api/admin/spot-checks", params={"failures": failures})
    assert r.status_code == 200, r.text
    (view,) = r.json()["edges"]
    return view  # type: ignore[no-any-return]


def test_failing_checks_quarantine_the_edge_until_an_admin_trusts_it(pool: Coordinator) -> None:
    svc = pool.admin("POST", "/api/admin/service-keys", json={"name": "gateway"}).json()["key"]

    def report(body: dict[str, Any]) -> None:
        r = pool.http.post("/api/service/spot-checks", json=body, headers=bearer(svc))
        assert r.status_code == 204, r.text

    assert routed(pool, svc) == ({"edge"}, RATE)  # the rate the gateways sample at comes with the routes
    assert edge_view(pool)["pass_rate"] is None

    # failures first: no verdict before the minimum, however bad the rate
    tally = Tally()
    for n in range(MIN_CHECKS - 1):
        report(verdict(False, n, sample={"request": "x" * 100, "edge": "y", "core": "z"}))
        tally = add(tally, False, HALF_LIFE)
    view = edge_view(pool)
    assert view["checks"] == MIN_CHECKS - 1 and view["pass_rate"] == 0.0 and not view["quarantined"]
    assert routed(pool, svc)[0] == {"edge"}
    # passes lift the rate; at the minimum a rate still under the threshold quarantines
    report(verdict(True, 100))
    tally = add(tally, True, HALF_LIFE)
    assert tally.rate is not None and tally.rate < BELOW
    view = edge_view(pool)
    assert view["quarantined"] and view["since"] and view["checks"] == MIN_CHECKS
    assert view["pass_rate"] == pytest.approx(tally.rate)
    assert "pass rate" in view["reason"] and "4 of 5 checks failed" in view["reason"]
    # the failing samples, newest first, at most KEPT per edge; a pass keeps no sample
    assert view["samples_kept"] == KEPT and view["failures"] == MIN_CHECKS - 1
    assert [f["request_sha256"] for f in view["recent_failures"]] == [
        hashlib.sha256(str(n).encode()).hexdigest() for n in (3, 2, 1)
    ]
    assert view["recent_failures"][0]["sample"]["request"] == "x" * 100
    assert view["recent_failures"][0]["reporter"].startswith("service:")

    # gone from the routes the core's gateways fetch; audited with the reason
    assert routed(pool, svc) == (set(), RATE)
    # named apart, so a gateway whose only edge is quarantined still says the core served
    assert pool.http.post("/api/service/edge-routes", headers=bearer(svc)).json()["quarantined"] == ["edge"]
    (event,) = pool.admin("GET", "/api/admin/audit", params={"action": "edge.quarantine"}).json()
    assert event["subject"] == "edge" and event["detail"]["reason"] == view["reason"]
    # more reports keep counting, with no second quarantine event
    report(verdict(True, 101))
    assert len(pool.admin("GET", "/api/admin/audit", params={"action": "edge.quarantine"}).json()) == 1

    # the registry page: the section, and the alarm with the reason
    login = pool.http.post("/registry/login", data={"admin_key": pool.admin_key})
    assert login.status_code == 303, login.text
    html = pool.http.get("/registry", params={"partial": True}).text
    assert 'id="spot-checks"' in html and 'data-edge="edge"' in html and 'id="quarantined-edges"' in html
    assert "4 of 5 checks failed" in html and 'class="alert edge-quarantined"' in html

    # the admin's view on the command line
    code, text = rma(pool, "edges", "checks")
    assert code == 0 and "quarantined since" in text and "4 of 5 checks failed" in text, text
    assert "5.0% of edge answers re-checked" in text and "scored -6.5" in text
    code, text = rma(pool, "edges", "trust", "north")
    assert code != 0 and "no edge cluster 'north'" in text, text

    # the admin trusts it again: routed, the rate starts anew, audited; the samples stay for the record
    r = pool.admin("POST", "/api/admin/edges/edge/trust")
    assert r.status_code == 200, r.text
    assert not r.json()["quarantined"] and r.json()["checks"] == 0 and r.json()["pass_rate"] is None
    assert r.json()["samples_kept"] == KEPT
    assert routed(pool, svc) == ({"edge"}, RATE)
    (trusted,) = pool.admin("GET", "/api/admin/audit", params={"action": "edge.trust"}).json()
    assert trusted["detail"]["was_quarantined"] is True and trusted["actor"].startswith("admin:")
    assert 'id="quarantined-edges"' not in pool.http.get("/registry", params={"partial": True}).text
    assert pool.admin("POST", "/api/admin/edges/north/trust").status_code == 404
    assert rma(pool, "edges", "trust", "edge") == (
        0,
        "edge edge trusted again: routed, its pass rate starts anew\n",
    )
    assert pool.http.post("/api/admin/edges/edge/trust").status_code == 401


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_only_the_core_reports_and_bad_reports_name_their_field(pool: Coordinator) -> None:
    svc = pool.admin("POST", "/api/admin/service-keys", json={"name": "gateway"}).json()["key"]

    def report(body: dict[str, Any], headers: dict[str, str] | None) -> httpx.Response:
        # json.dumps, not httpx's json=: Python's encoder writes NaN, as a careless reporter might
        raw = json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        return pool.http.post("/api/service/spot-checks", content=raw, headers=h)

    assert report(verdict(True), None).status_code == 401
    unknown = credentials.mint(credentials.Kind.SERVICE).token  # the right shape, no such key
    assert report(verdict(True), bearer(unknown)).status_code == 401
    trusted = pool.join(trusted=True)["node_token"]  # a trusted donor joins the core
    untrusted = pool.join(trusted=False)  # an untrusted one joins the edge
    assert untrusted["cluster"] == "edge"
    assert report(verdict(True), bearer(trusted)).status_code == 204
    assert report(verdict(True), bearer(untrusted["node_token"])).status_code == 403
    assert report({"edge": "edge"}, bearer(untrusted["node_token"])).status_code == 403  # before the body
    # a client's key, and the edge's own credential (what every forwarded request shows the edge) are refused
    client = pool.admin("POST", "/api/admin/clients", json={"name": "alice"}).json()["key"]
    assert report(verdict(False), bearer(client)).status_code == 401
    routes = pool.http.post("/api/service/edge-routes", headers=bearer(svc)).json()["edges"]
    assert routes and report(verdict(False), bearer(routes[0]["token"])).status_code == 401
    # a lone surrogate in a failing sample (an edge's text, escaped) is stored replaced, never a 500
    raw = json.dumps(verdict(False, 99, sample={"edge": "x"})).replace('"x"', '"\\ud800"').encode()
    r = pool.http.post(
        "/api/service/spot-checks", content=raw, headers={"Content-Type": "application/json", **bearer(svc)}
    )
    assert r.status_code == 204, r.text
    for bad, field in (
        (verdict(True, extra=1), "extra"),
        (verdict(True, kind="video"), "kind"),
        (verdict(True, request_sha256="abc"), "request_sha256"),
        (verdict(True, edge="north"), "edge"),
        (verdict(True, score=float("nan")), "score"),
        ({k: v for k, v in verdict(True).items() if k != "passed"}, "passed"),
    ):
        r = report(bad, bearer(svc))
        assert r.status_code == 422 and field in r.json()["error"]["message"], (bad, r.text)
    view = edge_view(pool)
    assert view["checks"] == 2 and view["samples_kept"] == 1  # the trusted donor's pass, the surrogate's fail
    with pool.state.sessions() as s, s.begin():  # the rest of the test counts passes only
        s.execute(delete(SpotCheck).where(SpotCheck.passed.is_(False)))

    # passes past the retention are pruned (the pass rate keeps their weight); a pass never keeps a sample
    old = utcnow() - timedelta(hours=pool.state.settings.spot_check_retention_h + 1)
    with pool.state.sessions() as s, s.begin():
        s.execute(update(SpotCheck).values(at=old))
    assert report(verdict(True, 7, sample={"request": "secret"}), bearer(svc)).status_code == 204
    with pool.state.sessions() as s:
        kept = list(s.scalars(select(SpotCheck)))
    assert [(c.request_sha256, c.sample) for c in kept] == [(verdict(True, 7)["request_sha256"], None)]
    assert edge_view(pool)["checks"] == 3

    # an edge no longer configured, with a record left (quarantined): trust removes the record and its samples
    with pool.state.sessions() as s, s.begin():
        s.add(
            EdgeReputation(
                edge="gone", checks=30, failures=30, quarantined_at=utcnow(), quarantine_reason="x"
            )
        )
        v = verdict(False, 5)
        s.add(
            SpotCheck(
                **{k: v[k] for k in ("app", "kind", "path", "passed", "score", "threshold")},
                edge="gone",
                request_sha256=v["request_sha256"],
                reporter="service:x",
                sample=v["sample"],
            )
        )
    assert pool.admin("POST", "/api/admin/edges/gone/trust").status_code == 200
    with pool.state.sessions() as s:
        assert s.get(EdgeReputation, "gone") is None and not list(
            s.scalars(select(SpotCheck).where(SpotCheck.edge == "gone"))
        )
    assert pool.admin("POST", "/api/admin/edges/never/trust").status_code == 404


def test_a_verdict_names_the_donor_that_answered_and_a_failing_donor_is_quarantined_alone(
    pool: Coordinator,
) -> None:
    """The edge head's HAProxy names the replica's address (`upstream`, rma_ray.upstream); the coordinator
    gives the verdict to the edge's donor at that address too. A donor under the threshold is quarantined
    (drained, audited, shown) while the edge, whose other donor passes, stays routed."""
    svc = pool.admin("POST", "/api/admin/service-keys", json={"name": "gateway"}).json()["key"]

    def report(body: dict[str, Any]) -> None:
        r = pool.http.post("/api/service/spot-checks", json=body, headers=bearer(svc))
        assert r.status_code == 204, r.text

    bad, good = pool.join(trusted=False), pool.join(trusted=False)
    assert bad["cluster"] == good["cluster"] == "edge"
    # both registered from 127.0.0.1 here: the overlay addresses the coordinator gave them tell them apart
    with pool.state.sessions() as s, s.begin():
        s.execute(update(Worker).where(Worker.id == bad["worker_id"]).values(overlay_ip="10.77.0.2"))
        s.execute(update(Worker).where(Worker.id == good["worker_id"]).values(overlay_ip="10.77.0.3"))
    n = 0
    for _ in range(MIN_CHECKS):
        for _ in range(9):  # the honest donor's passes keep the edge's own rate over the threshold
            n += 1
            report(verdict(True, n, upstream="10.77.0.3:30001"))
        n += 1
        report(verdict(False, n, upstream="10.77.0.2:30002"))
    # an address no donor of the edge has, and none at all: the edge's verdicts only
    report(verdict(True, n + 1, upstream="10.77.0.9:30001"))
    report(verdict(True, n + 2))
    # an embeddings answer's ingress hands the work to the embedder, maybe on another donor: the edge's alone
    report(
        verdict(
            True, n + 3, app="embeddings", kind="embeddings", path="/v1/embeddings", upstream="10.77.0.3:1"
        )
    )

    view = edge_view(pool, failures=1)
    assert not view["quarantined"] and view["checks"] == MIN_CHECKS * 10 + 3
    donors = {d["id"]: d for d in view["donors"]}
    assert (
        donors[bad["worker_id"]]["checks"] == MIN_CHECKS
        and donors[bad["worker_id"]]["failures"] == MIN_CHECKS
    )
    assert donors[bad["worker_id"]]["quarantined"] and donors[bad["worker_id"]]["pass_rate"] == 0.0
    assert (
        donors[good["worker_id"]]["checks"] == MIN_CHECKS * 9 and not donors[good["worker_id"]]["quarantined"]
    )
    assert view["donors"][0]["id"] == bad["worker_id"]  # the worst first
    assert view["unattributed"] == 3
    (failure,) = view["recent_failures"]
    assert failure["donor"] == bad["worker_id"] and failure["upstream"] == "10.77.0.2:30002"
    # the donor is quarantined like one whose hardware lied: drained on its heartbeat, audited; the other is not
    with pool.state.sessions() as s:
        workers = {w.id: w for w in s.scalars(select(Worker))}
    assert workers[bad["worker_id"]].action == "drain"
    assert "spot-checks" in (workers[bad["worker_id"]].quarantine_reason or "")
    assert (
        workers[good["worker_id"]].quarantine_reason is None and workers[good["worker_id"]].action == "none"
    )
    # its node credential no longer fetches the cluster token (a restart could not bring it back); the other's does
    refused = pool.http.get("/api/worker/ray", headers=bearer(bad["node_token"]))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "quarantined", refused.text
    assert pool.http.get("/api/worker/ray", headers=bearer(good["node_token"])).status_code == 200
    (event,) = pool.admin("GET", "/api/admin/audit", params={"action": "worker.quarantine"}).json()
    assert event["subject"] == bad["worker_id"] and event["detail"]["edge"] == "edge"
    assert routed(pool, svc)[0] == {"edge"}
    # the admin's views: the registry page's row per donor, and `rma edges checks`
    login = pool.http.post("/registry/login", data={"admin_key": pool.admin_key})
    assert login.status_code == 303, login.text
    html = pool.http.get("/registry", params={"partial": True}).text
    assert f'data-donor="{bad["worker_id"]}" data-quarantined="true"' in html
    assert f'data-donor="{good["worker_id"]}" data-quarantined="false"' in html
    code, text = rma(pool, "edges", "checks")
    assert (
        code == 0 and f"donor {bad['worker_id']} donor: {MIN_CHECKS} of {MIN_CHECKS} checks failed" in text
    ), text
    assert f", donor {bad['worker_id']}" in text  # the recent failure names the donor that answered
    # an upstream that is not an address and a port is refused with the field named
    r = pool.http.post(
        "/api/service/spot-checks", json=verdict(True, upstream="x; drop"), headers=bearer(svc)
    )
    assert r.status_code == 422 and "upstream" in r.json()["error"]["message"], r.text
    # trusting the edge again starts its donors' records anew; the donor's quarantine stays (the worker's own)
    assert pool.admin("POST", "/api/admin/edges/edge/trust").status_code == 200
    assert edge_view(pool)["donors"] == []
    with pool.state.sessions() as s:
        assert s.get(Worker, bad["worker_id"]).quarantine_reason  # type: ignore[union-attr]
