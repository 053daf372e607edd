"""Serve request metrics per cluster (issue 17): the core's and an edge's Serve ingress, each with its own rollups,
baseline and cursors; an edge proxy's restart, an edge that does not answer; `?cluster=` and the rows' cluster in
GET /api/admin/metrics. Fixed Prometheus text in the shape Ray 2.60 exports (tests/unit/data/serve_metrics); two
small Starlette apps play the two clusters' dashboards and node endpoints (no Ray in unit tests)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from admission import migrate
from admission.db import make_engine, make_sessionmaker
from admission.main import build_state, create_app, prepare_database
from admission.models import DeploymentLoad, MetricCursor, RequestMinute
from admission.services import metrics
from rma_ray.settings import Settings
from tests.support import ServerThread

T0 = datetime(2026, 12, 5, 9, 0, 5, tzinfo=UTC)
TARGET = "10.88.0.1:44217"  # the same address in both clusters: their cursors must still be apart
ADMIN = "rma_admin_" + "a" * 12 + "_" + "b" * 64
_COMMON = 'Component="core_worker",SessionName="s",Version="2.60.0",otel_scope_name="ray"'


def prom(app: str, procs: dict[str, dict[str, int]], queued: float = 0.0) -> str:
    """Serve ingress processes (WorkerId -> requests per status code) of one app: their request counter and
    latency histogram (every request under 10 ms), and the queue gauge of the deployment behind them, in the
    shape Ray 2.60 exports them."""
    counters = ["# TYPE ray_serve_num_http_requests_total counter"]
    hists = ["# TYPE ray_serve_http_request_latency_ms histogram"]
    for worker, counts in procs.items():
        ident = f'{_COMMON},WorkerId="{worker}",application="{app}",method="POST",route="/v1"'
        for code, n in counts.items():
            counters.append(f'ray_serve_num_http_requests_total{{{ident},status_code="{code}"}} {n}.0')
            for le in ("10.0", "100.0", "+Inf"):
                hists.append(
                    f'ray_serve_http_request_latency_ms_bucket{{{ident},le="{le}",status_code="{code}"}} {n}.0'
                )
            hists.append(f'ray_serve_http_request_latency_ms_count{{{ident},status_code="{code}"}} {n}.0')
            hists.append(f'ray_serve_http_request_latency_ms_sum{{{ident},status_code="{code}"}} {n * 5}.0')
    gauge = [
        "# TYPE ray_serve_deployment_queued_queries gauge",
        f'ray_serve_deployment_queued_queries{{{_COMMON},WorkerId="h",application="{app}",deployment="LLM"}} {queued}',
    ]
    return "\n".join([*counters, *hists, *gauge]) + "\n"


def ray_app(name: str, state: dict[str, Any]) -> Starlette:
    """One cluster's Ray as the collector sees it: its dashboard's Prometheus target list and node table (both
    503 while `state["down"]`), and one node's metrics endpoint serving `state["text"]`."""

    async def sd(req: Request) -> Response:
        if state["down"]:
            return Response(status_code=503)
        assert req.headers.get("authorization") == f"Bearer {name}-token"
        return JSONResponse([{"labels": {"job": "ray"}, "targets": [state["host"]]}])

    async def nodes(req: Request) -> Response:
        return Response(status_code=503) if state["down"] else JSONResponse({"data": {"summary": []}})

    async def scrape(req: Request) -> PlainTextResponse:
        assert req.headers.get("authorization") is None  # no cluster token to a node's endpoint
        return PlainTextResponse(state["text"])

    async def healthz(req: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/api/prometheus/sd", sd),
            Route("/nodes", nodes),
            Route("/metrics", scrape),
            Route("/healthz", healthz),
        ]
    )


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Any]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate.upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def store(sessions: Any, at: datetime, *texts: tuple[str, str], **kw: Any) -> dict[str, int]:
    """One pass: (cluster, Prometheus text) of each endpoint that answered, all at TARGET."""
    reading = metrics.Reading()
    for cluster, text in texts:
        reading.merge(metrics.parse(text, TARGET, cluster))
    with sessions() as s, s.begin():
        return metrics.store(s, reading, at, **kw)


def counted(sessions: Any) -> dict[tuple[str, str], int]:
    """(cluster, application) -> requests in the rollups."""
    out: dict[tuple[str, str], int] = {}
    with sessions() as s:
        for r in s.query(RequestMinute):
            out[(r.cluster, r.application)] = out.get((r.cluster, r.application), 0) + r.requests
    return out


def test_each_cluster_counts_its_own_deltas(sessions: Any) -> None:
    out = store(
        sessions,
        T0,
        ("core", prom("gateway", {"c1": {"200": 40}})),
        ("edge", prom("llm", {"e1": {"200": 9}})),
    )
    assert out["baselines"] == 2 and counted(sessions) == {}  # what both served before the collector saw them
    store(
        sessions,
        T0 + timedelta(seconds=10),
        ("core", prom("gateway", {"c1": {"200": 52, "503": 1}})),
        ("edge", prom("llm", {"e1": {"200": 17}}, queued=2)),
    )
    assert counted(sessions) == {("core", "gateway"): 13, ("edge", "llm"): 8}
    with sessions() as s:
        assert {(r.cluster, r.status_code, r.latency_count) for r in s.query(RequestMinute)} == {
            ("core", "200", 12),
            ("core", "503", 1),
            ("edge", "200", 8),
        }
        assert {(d.cluster, d.application, d.queued) for d in s.query(DeploymentLoad)} == {
            ("core", "gateway", 0.0),
            ("edge", "llm", 2.0),
        }
        # one marker per cluster; the core's is the one of before edges existed
        assert s.get(MetricCursor, metrics.MARKER) and s.get(MetricCursor, metrics.marker("edge"))
    # the same series names at the same address in two clusters are two series
    core, edge = (metrics.parse(prom("llm", {"x": {"200": 1}}), TARGET, c) for c in ("core", "edge"))
    assert not set(core.counters) & set(edge.counters)


def test_an_edge_proxy_restart_counts_from_zero_and_a_new_proxy_in_full(sessions: Any) -> None:
    store(
        sessions,
        T0,
        ("core", prom("gateway", {"c1": {"200": 5}})),
        ("edge", prom("llm", {"e1": {"200": 30}})),
    )
    # the edge's proxy restarted under the same labels (its counter fell to 4) and a second proxy was born (3)
    restarted = prom("llm", {"e1": {"200": 4}, "e2": {"200": 3}})
    store(
        sessions,
        T0 + timedelta(seconds=10),
        ("core", prom("gateway", {"c1": {"200": 12}})),
        ("edge", restarted),
    )
    assert counted(sessions) == {("core", "gateway"): 7, ("edge", "llm"): 4 + 3}
    store(
        sessions, T0 + timedelta(seconds=20), ("edge", prom("llm", {"e1": {"200": 6}}))
    )  # +2, the core quiet
    assert counted(sessions) == {("core", "gateway"): 7, ("edge", "llm"): 9}


def test_an_edge_that_does_not_answer_is_skipped_and_keeps_its_cursors(sessions: Any) -> None:
    store(
        sessions,
        T0,
        ("core", prom("gateway", {"c1": {"200": 1}})),
        ("edge", prom("llm", {"e1": {"200": 10, "429": 1}})),
    )
    store(sessions, T0 + timedelta(seconds=10), ("edge", prom("llm", {"e1": {"200": 12, "429": 1}})))
    text = prom("llm", {"e1": {"200": 12, "429": 1}})
    edge = metrics.parse(text, TARGET, "edge")
    edge_ids = {*edge.counters, *edge.histograms, metrics.marker("edge")}
    with sessions() as s:
        before = {c.id: (dict(c.value), c.seen_at) for c in s.query(MetricCursor) if c.id in edge_ids}
    assert before.keys() == edge_ids
    # the edge down for two passes: only the core answered (and its endpoints are all there)
    for i in (2, 3):
        store(
            sessions,
            T0 + timedelta(seconds=10 * i),
            ("core", prom("gateway", {"c1": {"200": 1 + i}})),
            answered={"core"},
        )
    with sessions() as s:
        assert {c.id: (dict(c.value), c.seen_at) for c in s.query(MetricCursor) if c.id in edge_ids} == before
        assert {(d.cluster, d.application) for d in s.query(DeploymentLoad)} == {
            ("core", "gateway"),
            ("edge", "llm"),  # its last value kept (not complete), until LOAD_STALE
        }
    # back: everything it served meanwhile, counted once; not its whole history, not zero
    store(
        sessions,
        T0 + timedelta(seconds=40),
        ("core", prom("gateway", {"c1": {"200": 4}})),
        ("edge", prom("llm", {"e1": {"200": 20, "429": 2}})),
    )
    assert counted(sessions) == {("core", "gateway"): 3, ("edge", "llm"): 2 + 9}
    # an edge that answers only later (its first pass: a baseline) while the core goes on counting
    store(
        sessions,
        T0 + timedelta(seconds=50),
        ("core", prom("gateway", {"c1": {"200": 6}})),
        ("eu", prom("llm", {"u": {"200": 70}})),
    )
    assert counted(sessions) == {("core", "gateway"): 5, ("edge", "llm"): 11}
    # the edge away for two days, past the 48 h retention, while the core answers: its cursors and its marker
    # expire together, so its return is a first read (a baseline), not its whole history counted again
    later = T0 + timedelta(hours=48, minutes=30)
    store(sessions, later, ("core", prom("gateway", {"c1": {"200": 7}})), answered={"core"})
    with sessions() as s, s.begin():
        metrics.prune(s, T0 + timedelta(hours=49), 48)
    with sessions() as s:
        assert s.get(MetricCursor, metrics.MARKER) is not None
        assert not {c.id for c in s.query(MetricCursor)} & edge_ids
    out = store(
        sessions,
        T0 + timedelta(hours=49),
        ("core", prom("gateway", {"c1": {"200": 8}})),
        ("edge", prom("llm", {"e1": {"200": 500, "429": 2}})),
    )
    # the rows of before the retention are gone; the edge's 500 are history, not its first minute's traffic
    assert out["baselines"] == 1 and counted(sessions) == {("core", "gateway"): 1 + 1}


def test_a_first_read_is_done_only_once_the_whole_cluster_answered(sessions: Any) -> None:
    """An edge whose second proxy did not answer its first read: that proxy's history, seen later, is not new
    traffic; the marker is written by the first pass in which every endpoint answered."""
    store(sessions, T0, ("edge", prom("llm", {"e1": {"200": 30}})), answered={"edge"}, complete=set())
    with sessions() as s:
        assert s.get(MetricCursor, metrics.marker("edge")) is None
    out = store(
        sessions,
        T0 + timedelta(seconds=10),
        ("edge", prom("llm", {"e1": {"200": 32}, "e2": {"200": 900}})),  # e2's endpoint answers at last
        answered={"edge"},
    )
    assert out["baselines"] == 1 and counted(sessions) == {("edge", "llm"): 2}  # e1's rise; e2's baseline
    with sessions() as s:
        assert s.get(MetricCursor, metrics.marker("edge")) is not None
    store(sessions, T0 + timedelta(seconds=20), ("edge", prom("llm", {"e1": {"200": 33}, "e3": {"200": 4}})))
    assert counted(sessions) == {("edge", "llm"): 2 + 1 + 4}  # e3: a proxy born since, counted in full


def test_the_pool_totals_are_the_clients_requests_and_rows_name_their_cluster(sessions: Any) -> None:
    store(
        sessions, T0, ("core", prom("gateway", {"c1": {"200": 0}})), ("edge", prom("llm", {"e1": {"200": 0}}))
    )
    # 20 client requests through the core's gateway, 15 of them forwarded to the edge's llm app
    store(
        sessions,
        T0 + timedelta(seconds=10),
        ("core", prom("gateway", {"c1": {"200": 20}})),
        ("edge", prom("llm", {"e1": {"200": 15}}, queued=1)),
    )
    now = T0 + timedelta(minutes=5)
    with sessions() as s:
        pool = metrics.summary(s, None, now)
        edge = metrics.summary(s, None, now, cluster="edge")
        core = metrics.summary(s, None, now, cluster="core")
    assert pool.cluster is None and pool.today.requests == 20 and sum(pool.series.requests) == 20
    assert [(a.cluster, a.application, a.requests) for a in pool.applications] == [
        ("core", "gateway", 20),
        ("edge", "llm", 15),
    ]
    assert [(q.cluster, q.application, q.queued) for q in pool.queues] == [
        ("core", "gateway", 0),
        ("edge", "llm", 1),
    ]
    assert pool.queued_total == 1
    assert edge.cluster == "edge" and edge.today.requests == 15 and edge.last_hour.requests == 15
    assert [(a.cluster, a.application) for a in edge.applications] == [("edge", "llm")]
    assert [q.cluster for q in edge.queues] == ["edge"] and sum(edge.series.requests) == 15
    assert core.today.requests == 20 and [a.cluster for a in core.applications] == ["core"]


def test_the_collector_reads_both_clusters_over_http_and_skips_one_that_does_not_answer(
    tmp_path: Path,
) -> None:
    """Two clusters' dashboards (Prometheus target list, node table) and node endpoints over real HTTP; the
    edge's dashboard goes away for a pass, then comes back; the API's `?cluster=` and rows."""
    core = {"down": False, "text": prom("gateway", {"c1": {"200": 3}}), "host": ""}
    edge = {"down": False, "text": prom("llm", {"e1": {"200": 2}}), "host": ""}
    (tmp_path / "core_token").write_text("core-token\n")
    (tmp_path / "edge_token").write_text("edge-token\n")
    with ServerThread(ray_app("core", core)) as c_ray, ServerThread(ray_app("edge", edge)) as e_ray:
        core["host"], edge["host"] = (r.url.removeprefix("http://") for r in (c_ray, e_ray))
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            data_dir=tmp_path,
            admin_key=ADMIN,
            ray_dashboard_url=c_ray.url,
            ray_auth_token_file=tmp_path / "core_token",
            edges=[
                {
                    "name": "edge",
                    "ray_address": "127.0.0.1:1",
                    "dashboard_url": e_ray.url,
                    "serve_url": e_ray.url,
                    "token_file": str(tmp_path / "edge_token"),
                }
            ],
        )
        state = build_state(settings)
        prepare_database(state)
        collector = metrics.Collector(state, interval_s=1)  # not started: passes by hand
        t = datetime.now(UTC).replace(second=0, microsecond=0)
        assert collector.collect_once(t)["baselines"] == 2
        core["text"], edge["text"] = prom("gateway", {"c1": {"200": 10}}), prom("llm", {"e1": {"200": 6}})
        assert collector.collect_once(t + timedelta(seconds=10))["requests"] == 7 + 4
        edge["down"], edge["text"] = True, prom("llm", {"e1": {"200": 9}})
        core["text"] = prom("gateway", {"c1": {"200": 13}})
        assert collector.collect_once(t + timedelta(seconds=20))["requests"] == 3
        assert collector.view.clusters == ["core"] and collector.view.error is None
        # a cluster not listed is named apart from the endpoints it scraped (no "Scraped -1 of 1")
        assert [u.split(":")[0] for u in collector.view.unlisted] == ["edge"]
        assert collector.view.unreachable == [] and collector.view.targets == 1
        edge["down"] = False
        assert collector.collect_once(t + timedelta(seconds=30))["requests"] == 3  # the edge's 3 meanwhile
        assert collector.view.clusters == ["core", "edge"] and collector.view.unlisted == []
    with state.sessions() as s:
        assert metrics.summary(s, collector, cluster="edge").today.requests == 4 + 3
    state.engine.dispose()
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        pool = client.get("/api/admin/metrics", headers=auth).json()
        assert pool["cluster"] is None and pool["today"]["requests"] == 10  # the clients', through the core
        assert {(a["cluster"], a["application"], a["requests"]) for a in pool["applications"]} == {
            ("core", "gateway", 10),
            ("edge", "llm", 7),
        }
        one = client.get("/api/admin/metrics", params={"cluster": "edge"}, headers=auth).json()
        assert one["cluster"] == "edge" and one["today"]["requests"] == 7
        assert [q["cluster"] for q in one["queues"]] == ["edge"]
        for bad in ("nowhere", "x" * 40):
            r = client.get("/api/admin/metrics", params={"cluster": bad}, headers=auth)
            assert r.status_code == 422 and "cluster" in r.json()["error"]["message"], r.text
        assert (
            "core, edge"
            in client.get("/api/admin/metrics?cluster=nowhere", headers=auth).json()["error"]["message"]
        )
        # the registry page's Requests section: a row per cluster and application, its cluster shown
        login = client.post("/registry/login", data={"admin_key": ADMIN}, follow_redirects=False)
        assert login.status_code == 303
        page = client.get("/registry").text
    for app, n in (("core/gateway", 10), ("edge/llm", 7)):
        cluster = app.split("/")[0]
        assert (
            f'data-app="{app}" data-cluster="{cluster}" data-requests="{n}"><td class="cluster">{cluster}<'
            in page
        )
    assert 'data-deployment="llm/LLM" data-cluster="edge"><td class="cluster">edge<' in page


def hostile(app: str) -> str:
    """An edge donor's endpoint writing what no Serve process does: counts not finite, huge or negative, a
    histogram with a NaN bucket and an infinite sum, queue gauges near the float's limit."""
    ident = f'{_COMMON},WorkerId="x",application="{app}",method="POST",route="/v1"'
    lines = ["# TYPE ray_serve_num_http_requests_total counter"]
    for code, v in (("200", "+Inf"), ("201", "NaN"), ("202", "1e30"), ("203", "-5")):
        lines.append(f'ray_serve_num_http_requests_total{{{ident},status_code="{code}"}} {v}')
    lines.append("# TYPE ray_serve_http_request_latency_ms histogram")
    for code, v, le in (("200", "NaN", "10.0"), ("201", "1e30", "+Inf"), ("202", "1", "nope")):
        lines.append(
            f'ray_serve_http_request_latency_ms_bucket{{{ident},le="{le}",status_code="{code}"}} {v}'
        )
    lines.append(f'ray_serve_http_request_latency_ms_sum{{{ident},status_code="203"}} +Inf')
    for fam in ("ray_serve_deployment_queued_queries", "ray_serve_num_ongoing_requests_at_replicas"):
        lines.append(f"# TYPE {fam} gauge")
        for w in ("a", "b"):
            lines.append(f'{fam}{{{_COMMON},WorkerId="{w}",application="{app}",deployment="LLM"}} 1e308')
    return "\n".join(lines) + "\n"


def test_values_no_serve_process_writes_are_dropped_and_the_pass_goes_on(
    sessions: Any, tmp_path: Path
) -> None:
    edge = metrics.parse(prom("llm", {"e1": {"200": 9}}) + hostile("llm"), TARGET, "edge")
    assert [k[3] for _, k, _ in edge.counters.values()] == ["200"]  # e1's, the honest one
    assert [k[3] for _, k, _ in edge.histograms.values()] == ["200"]
    for _, _, h in edge.histograms.values():
        assert h.count == 9 and set(h.buckets) == {"10.0", "100.0", "+Inf"}
    store(
        sessions, T0, ("core", prom("gateway", {"c1": {"200": 1}})), ("edge", prom("llm", {"e1": {"200": 9}}))
    )
    store(
        sessions,
        T0 + timedelta(seconds=10),
        ("core", prom("gateway", {"c1": {"200": 5}})),
        ("edge", prom("llm", {"e1": {"200": 12}}) + hostile("llm")),
    )
    assert counted(sessions) == {("core", "gateway"): 4, ("edge", "llm"): 3}
    with sessions() as s:
        load = s.get(DeploymentLoad, ("edge", "llm", "LLM"))
        assert load is not None and load.queued == load.ongoing == metrics.MAX_COUNT
    # one target serving more series than any Serve process does is not read at all
    many = prom("llm", {f"w{i}": {"200": 1} for i in range(400)})
    with pytest.raises(ValueError, match=str(metrics.MAX_SERIES)):
        metrics.parse(many, TARGET, "edge")
    # the registry page renders the clamped queue (no int(inf))
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path, admin_key=ADMIN
    )
    with TestClient(create_app(settings)) as client:
        assert (
            client.post("/registry/login", data={"admin_key": ADMIN}, follow_redirects=False).status_code
            == 303
        )
        page = client.get("/registry")
    assert page.status_code == 200 and f'id="queued-now">{metrics.MAX_COUNT}<' in page.text


def test_an_edge_that_never_answers_is_not_waited_for_and_a_core_not_listed_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two edges whose dashboard accepts TCP and never replies (a bare listening socket): they are listed side by
    side with the core and the answering edge, their node tables not asked after the timeout; one answering edge
    serving too many series is a failed target; the core's dashboard down is the pass's error."""
    import socket
    import threading

    monkeypatch.setattr(metrics, "TIMEOUT", httpx.Timeout(1, connect=1))  # the test's; 5 s in production
    both = threading.Barrier(2, timeout=20)  # passed only while the two silent edges are listed together
    serial: list[str] = []
    node_tables: list[str] = []
    discover, discover_nodes = metrics.discover, metrics.contributions.discover_nodes

    def counted_discover(state: Any, http: Any, cluster: str = "core") -> list[str]:
        if cluster.startswith("mute"):
            try:
                both.wait()
            except threading.BrokenBarrierError:
                serial.append(cluster)
        return discover(state, http, cluster)

    def counted_nodes(state: Any, http: Any, cluster: str = "core") -> dict[str, str]:
        node_tables.append(cluster)
        return discover_nodes(state, http, cluster)

    monkeypatch.setattr(metrics, "discover", counted_discover)
    monkeypatch.setattr(metrics.contributions, "discover_nodes", counted_nodes)
    core = {"down": False, "text": prom("gateway", {"c1": {"200": 3}}), "host": ""}
    edge = {"down": False, "text": prom("llm", {"e1": {"200": 2}}), "host": ""}
    for name in ("core", "edge", "mute1", "mute2"):
        (tmp_path / f"{name}_token").write_text(f"{name}-token\n")
    with (
        socket.create_server(("127.0.0.1", 0)) as mute,
        ServerThread(ray_app("core", core)) as c_ray,
        ServerThread(ray_app("edge", edge)) as e_ray,
    ):
        core["host"], edge["host"] = (r.url.removeprefix("http://") for r in (c_ray, e_ray))
        silent = f"http://127.0.0.1:{mute.getsockname()[1]}"
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            data_dir=tmp_path,
            admin_key=ADMIN,
            ray_dashboard_url=c_ray.url,
            ray_auth_token_file=tmp_path / "core_token",
            edges=[
                {
                    "name": name,
                    "ray_address": "127.0.0.1:1",
                    "dashboard_url": url,
                    "serve_url": url,
                    "token_file": str(tmp_path / f"{name}_token"),
                }
                for name, url in (("edge", e_ray.url), ("mute1", silent), ("mute2", silent))
            ],
        )
        state = build_state(settings)
        prepare_database(state)
        collector = metrics.Collector(state, interval_s=1)  # not started: passes by hand
        t = datetime.now(UTC).replace(second=0, microsecond=0)
        assert collector.collect_once(t)["baselines"] == 2
        assert serial == [] and sorted(node_tables) == ["core", "edge"]
        v = collector.view
        assert v.clusters == ["core", "edge"] and v.error is None and v.targets == 2 and v.unreachable == []
        assert sorted(u.split(":")[0] for u in v.unlisted) == ["mute1", "mute2"]
        # the edge's endpoint serves more series than any Serve process: not read; the core's counted
        core["text"], edge["text"] = (
            prom("gateway", {"c1": {"200": 10}}),
            prom("llm", {f"w{i}": {"200": 1} for i in range(400)}),
        )
        assert collector.collect_once(t + timedelta(seconds=10))["requests"] == 7
        assert collector.view.clusters == ["core"] and collector.view.error is None
        assert [u.split(":")[0] for u in collector.view.unreachable] == ["edge"]
        # the core's dashboard down while an edge answers: the pass's error says so
        core["down"], edge["text"] = True, prom("llm", {"e1": {"200": 4}})
        collector.collect_once(t + timedelta(seconds=20))
        assert collector.view.clusters == ["edge"]
        assert (collector.view.error or "").startswith("core: cannot list Ray's metrics endpoints")
    state.engine.dispose()
