"""The contribution ledger: parsing a node's endpoint, target -> node -> donor, counter deltas and gauge
integration across passes and restarts, the hourly rollup and pruning, credits, and the two routes' auth.

data/contributions/node.prom is shaped like a Ray 2.60 node's metrics endpoint (the label sets of a real
scrape: the reporter agent's per-process CPU gauge, Serve's replica-side request counter, vLLM's token
counter as Ray exports it, a GPU gauge), with @NAME@ placeholders for the values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from admission import migrate
from admission.db import make_engine, make_sessionmaker
from admission.main import build_state, create_app
from admission.models import ContributionMinute, MetricCursor, Worker
from admission.services import contributions as c
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.settings import Settings

DATA = Path(__file__).parent / "data" / "contributions"
T0 = datetime(2026, 12, 5, 9, 0, 0, tzinfo=UTC)
A, B, HEAD = "10.88.0.5:9100", "10.88.0.6:9100", "10.88.0.1:9100"
NODE_OF = {A: "a" * 56, B: "b" * 56, HEAD: "h" * 56}


def node_text(
    ip: str = "10.88.0.5",
    *,
    raylet: float = 10.0,
    replica: float = 35.0,
    req: float = 6.0,
    tok: float = 120.0,
    gpu: float | None = None,
) -> str:
    text = (DATA / "node.prom").read_text()
    if gpu is None:  # a node without GPUs exports no GPU gauge
        text = "\n".join(line for line in text.splitlines() if "gpus_utilization" not in line) + "\n"
    for k, v in {"IP": ip, "RAYLET": raylet, "REPLICA": replica, "REQ": req, "TOK": tok, "GPU": gpu}.items():
        text = text.replace(f"@{k}@", str(v))
    return text


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate.upgrade(engine)
    sm = make_sessionmaker(engine)
    with sm() as s, s.begin():
        for wid, node in (("donora", NODE_OF[A]), ("donorb", NODE_OF[B])):
            s.add(donor(wid, node))
    yield sm
    engine.dispose()


def donor(wid: str, ray_node_id: str | None, token_hash: str = "0" * 64) -> Worker:
    return Worker(
        id=wid,
        name=f"{wid}-pc",
        tier="service",
        capabilities={},
        labels={},
        node_token_hash=token_hash,
        ray_node_id=ray_node_id,
    )


def store(sm: sessionmaker[Session], texts: dict[str, str], at: datetime) -> dict[str, c.Amounts]:
    with sm() as s, s.begin():
        return c.store(s, {t: c.parse(x, t) for t, x in texts.items()}, NODE_OF, at)


def rows(sm: sessionmaker[Session]) -> dict[str, tuple[float, float, int, int]]:
    out: dict[str, tuple[float, float, int, int]] = {}
    with sm() as s:
        for r in s.query(ContributionMinute):
            cpu, gpu, req, tok = out.get(r.worker_id, (0.0, 0.0, 0, 0))
            out[r.worker_id] = (
                round(cpu + r.cpu_s, 6),
                round(gpu + r.gpu_s, 6),
                req + r.requests,
                tok + r.tokens,
            )
    return out


def test_parse_sums_the_nodes_processes_and_keys_each_counter_series() -> None:
    r = c.parse(node_text(raylet=10, replica=35, gpu=50), A)
    assert r.cpu_pct == 50.0  # raylet 10 + agent 5 + replica 35; the node-wide gauge (99) is not pool work
    assert r.gpu_pct == 50.0
    assert sorted(r.requests.values()) == [2.0, 6.0] and list(r.tokens.values()) == [120.0]
    assert c.parse(node_text(), A).requests.keys() != c.parse(node_text(), B).requests.keys()
    # no reporter gauge in this scrape (its TTL ran out): unknown, not zero
    no_cpu = "\n".join(x for x in node_text().splitlines() if "component_cpu" not in x) + "\n"
    assert c.parse(no_cpu, A).cpu_pct is None and c.parse(node_text(), A).gpu_pct == 0.0


def test_a_node_serving_too_many_series_is_not_read() -> None:
    """Each counter series becomes a cursor row: a donor's endpoint cannot grow the coordinator's database."""
    text = node_text()
    line = next(x for x in text.splitlines() if x.startswith("ray_serve_deployment_request_counter_total"))

    def with_routes(n: int) -> str:  # n more series of the family, in its block
        return text.replace(
            line, "\n".join([line, *(line.replace('route="/echo"', f'route="/r{i}"') for i in range(n))])
        )

    assert len(c.parse(with_routes(100), A).requests) > 100
    with pytest.raises(ValueError, match="contribution series"):
        c.parse(with_routes(c.MAX_SERIES), A)


def test_targets_map_to_live_nodes_from_the_dashboards_node_table() -> None:
    summary = {
        "data": {
            "summary": [
                {"raylet": {"nodeId": "n1", "nodeManagerAddress": "10.88.0.5", "metricsExportPort": 9100}},
                {
                    "raylet": {
                        "nodeId": "n2",
                        "nodeManagerAddress": "10.88.0.6",
                        "metricsExportPort": 9100,
                        "state": "DEAD",
                    }
                },
                {"raylet": {"nodeId": "n3", "nodeManagerAddress": "fd00::3", "metricsExportPort": 9200}},
                {"raylet": {"nodeId": "n4", "nodeManagerAddress": "10.88.0.7"}},  # no endpoint: nothing
                {"ip": "10.88.0.8"},
            ]
        }
    }
    assert c.node_targets(summary) == {"10.88.0.5:9100": "n1", "[fd00::3]:9200": "n3"}
    assert c.node_targets({}) == {} and c.node_targets(None) == {}


def test_first_pass_is_a_baseline_then_each_donor_gets_its_own_nodes_work(
    sessions: sessionmaker[Session],
) -> None:
    store(sessions, {A: node_text(req=6, tok=100), B: node_text("10.88.0.6", req=1), HEAD: node_text()}, T0)
    assert rows(sessions) == {}  # what ran before the ledger existed is not counted
    added = store(
        sessions,
        {
            A: node_text(req=16, tok=150),
            B: node_text("10.88.0.6", req=1, raylet=0, replica=0),
            HEAD: node_text(),
        },
        T0 + timedelta(seconds=10),
    )
    got = rows(sessions)
    # A: 50 % of a core for 10 s; 10 more requests and 50 more tokens. B: the agent's 5 % only, no requests
    assert got["donora"] == (5.0, 0.0, 10, 50)
    assert got["donorb"] == (0.5, 0.0, 0, 0)
    assert set(added) == {"donora", "donorb"}
    with sessions() as s:  # the head's endpoint is no donor's: no row, no cursor of its own
        assert all(cur.target != HEAD for cur in s.query(MetricCursor))


def test_values_no_ray_process_writes_leave_the_pass_whole(sessions: sessionmaker[Session]) -> None:
    """A donor's endpoint (an edge's, untrusted) serving infinite or huge counters and gauges: the counters are
    dropped, the gauges clamped; the pass and the other donor's figures go on."""
    store(sessions, {A: node_text(req=6, tok=100), B: node_text("10.88.0.6", req=1)}, T0)
    hostile = node_text(req=1e30, tok=float("inf"), raylet=1e308, replica=1e308)
    r = c.parse(hostile, A)
    assert sorted(r.requests.values()) == [2.0] and not r.tokens and r.cpu_pct == 5.0 + 2 * c.MAX_VALUE
    store(sessions, {A: hostile, B: node_text("10.88.0.6", req=4)}, T0 + timedelta(seconds=10))
    got = rows(sessions)
    assert got["donorb"][2] == 3  # B's 3 requests counted beside A's nonsense
    assert got["donora"][2:] == (0, 0) and 0 < got["donora"][0] < float("inf")


def test_restarts_gaps_and_a_missing_gauge(sessions: sessionmaker[Session]) -> None:
    store(sessions, {A: node_text(req=100)}, T0)
    store(sessions, {A: node_text(req=130)}, T0 + timedelta(seconds=10))  # +30, 5 cpu-s
    store(sessions, {A: node_text(req=4)}, T0 + timedelta(seconds=20))  # the replica restarted: +4, 5 cpu-s
    assert rows(sessions)["donora"] == (10.0, 0.0, 34, 0)
    # the reporter's gauges missing for a pass: nothing integrated, the next reading covers the 20 s
    no_cpu = "\n".join(x for x in node_text(req=4).splitlines() if "component_cpu" not in x) + "\n"
    store(sessions, {A: no_cpu}, T0 + timedelta(seconds=30))
    assert rows(sessions)["donora"] == (10.0, 0.0, 34, 0)
    store(sessions, {A: node_text(req=4)}, T0 + timedelta(seconds=40))
    assert rows(sessions)["donora"] == (20.0, 0.0, 34, 0)
    # an hour without passes (coordinator down): counters lose nothing, CPU counts MAX_GAP and no more
    store(sessions, {A: node_text(req=10, gpu=100)}, T0 + timedelta(hours=1, seconds=40))
    cpu, gpu, req, _ = rows(sessions)["donora"]
    gap = c.MAX_GAP.total_seconds()
    assert (cpu, gpu, req) == (20.0 + 0.5 * gap, 1.0 * gap, 40)


def test_a_restarted_coordinator_neither_loses_nor_double_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    for i, req in enumerate((5, 9, 9, 20)):  # a new engine each pass: only the database remembers
        engine = make_engine(url)
        migrate.upgrade(engine)
        sm = make_sessionmaker(engine)
        if i == 0:
            with sm() as s, s.begin():
                s.add(donor("donora", NODE_OF[A]))
        store(sm, {A: node_text(req=req)}, T0 + timedelta(seconds=10 * i))
        engine.dispose()
    engine = make_engine(url)
    assert rows(make_sessionmaker(engine))["donora"] == (15.0, 0.0, 15, 0)
    engine.dispose()


def test_a_pass_that_fails_writes_nothing(sessions: sessionmaker[Session]) -> None:
    store(sessions, {A: node_text(req=1)}, T0)
    with pytest.raises(RuntimeError), sessions() as s, s.begin():
        c.store(s, {A: c.parse(node_text(req=50), A)}, NODE_OF, T0 + timedelta(seconds=10))
        raise RuntimeError("the request metrics' part of the pass failed")
    store(sessions, {A: node_text(req=50)}, T0 + timedelta(seconds=20))
    assert rows(sessions)["donora"] == (10.0, 0.0, 49, 0)  # counted once, by the pass that committed


def test_rollup_into_hours_then_prune(sessions: sessionmaker[Session]) -> None:
    old = T0 - timedelta(hours=60)
    with sessions() as s, s.begin():
        for m in range(0, 120, 7):  # two hours of minutes, 60 h ago
            s.add(
                ContributionMinute(
                    minute=old + timedelta(minutes=m),
                    worker_id="donora",
                    cpu_s=1.5,
                    gpu_s=0.0,
                    requests=2,
                    tokens=3,
                )
            )
        s.add(
            ContributionMinute(
                minute=T0 - timedelta(minutes=5),
                worker_id="donora",
                cpu_s=1.0,
                gpu_s=0.0,
                requests=1,
                tokens=0,
            )
        )
        s.add(
            ContributionMinute(
                minute=T0 - timedelta(days=91), worker_id="donorb", cpu_s=9.0, gpu_s=0.0, requests=9, tokens=0
            )
        )
    before = rows(sessions)
    settings = Settings(database_url="sqlite://", data_dir=Path("/nonexistent"))
    with sessions() as s, s.begin():
        c.maintain(s, T0, settings)
    with sessions() as s:
        left = sorted(
            (r.minute, r.requests) for r in s.query(ContributionMinute).filter_by(worker_id="donora")
        )
        assert s.query(ContributionMinute).filter_by(worker_id="donorb").count() == 0  # past 90 days
    n_first = len(range(0, 60, 7))
    assert left == [
        (old, 2 * n_first),
        (old + timedelta(hours=1), 2 * (len(range(0, 120, 7)) - n_first)),
        (T0 - timedelta(minutes=5), 1),  # the last 48 h stay per minute
    ]
    assert rows(sessions)["donora"] == before["donora"]  # nothing lost in the rollup
    with sessions() as s, s.begin():  # again: an hour rolled is left alone
        assert c.rollup(s, T0, 48) == 0


def test_credits_are_weight_times_amount() -> None:
    w = c.weights(
        Settings(
            database_url="sqlite://",
            data_dir=Path("/nonexistent"),
            credit_per_cpu_hour=2,
            credit_per_gpu_hour=20,
            credit_per_1k_requests=0.5,
            credit_per_1k_tokens=0.1,
        )
    )
    a = c.Amounts(cpu_s=1800, gpu_s=360, requests=4000, tokens=10_000)
    assert c.credits(a, w) == pytest.approx(1.0 + 2.0 + 2.0 + 1.0)
    assert c.credits(c.Amounts(), w) == 0


def test_overview_and_one_donors_figures(tmp_path: Path) -> None:
    state = build_state(Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path))
    migrate.upgrade(state.engine)
    now = T0.replace(hour=12)
    with state.sessions() as s, s.begin():
        s.add_all([donor("donora", "n1"), donor("donorb", "n2")])
        s.flush()
        for minute, req in (
            (now - timedelta(minutes=3), 10),
            (now - timedelta(days=2), 5),
            (now - timedelta(days=30), 100),
        ):
            s.add(
                ContributionMinute(
                    minute=minute, worker_id="donora", cpu_s=3600.0, gpu_s=0.0, requests=req, tokens=0
                )
            )
    with state.sessions() as s:
        mine = c.for_worker(state, s, "donora", now=now)
        out = c.overview(state, s, now=now, hours=24)
    assert (mine.today.requests, mine.last_7d.requests, mine.all_time.requests) == (10, 15, 115)
    assert mine.all_time.cpu_s == 3 * 3600 and mine.all_time.credits == pytest.approx(3 + 0.115)
    assert [d.worker_id for d in out.donors] == ["donora", "donorb"]  # best first; b registered, gave nothing
    a = out.donors[0]
    assert (
        len(a.series.t) == 24 and sum(a.series.requests) == 10 and a.series.requests[-2] == 10
    )  # 11:57, the hour before now (12:00)
    assert out.donors[1].all_time.credits == 0 and sum(out.donors[1].series.credits) == 0
    pts = c.sparkline(a.series.credits).split()
    assert len(pts) == 24 and pts[-1].startswith("120.0,") and c.sparkline([]) == ""
    state.engine.dispose()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        data_dir=tmp_path,
        admin_key="rma_admin_" + "a" * 12 + "_" + "b" * 64,
    )
    with TestClient(create_app(settings)) as tc:
        state = tc.app.state.rma  # type: ignore[attr-defined]
        tokens = {}
        with state.sessions() as s, s.begin():
            for node in ("n1", "n2"):
                m = credentials.mint(Kind.NODE)
                s.add(donor(m.id, node, m.hash))
                tokens[node] = m.token
            s.flush()
            ids = {node: t.split("_")[2] for node, t in tokens.items()}
            s.add(
                ContributionMinute(minute=T0, worker_id=ids["n1"], cpu_s=7.0, gpu_s=0.0, requests=3, tokens=0)
            )
        yield tc, tokens


def test_a_donor_sees_its_own_contribution_and_only_an_admin_sees_everyones(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    tc, tokens = client
    assert tc.get("/api/worker/contribution").status_code == 401
    one = tc.get("/api/worker/contribution", headers={"Authorization": f"Bearer {tokens['n1']}"})
    two = tc.get("/api/worker/contribution", headers={"Authorization": f"Bearer {tokens['n2']}"})
    assert one.status_code == 200 and two.status_code == 200, (one.text, two.text)
    assert one.json()["worker_id"] == tokens["n1"].split("_")[2] and one.json()["all_time"]["requests"] == 3
    assert two.json()["all_time"] == {"cpu_s": 0.0, "gpu_s": 0.0, "requests": 0, "tokens": 0, "credits": 0.0}
    assert set(one.json()["weights"]) == {"per_cpu_hour", "per_gpu_hour", "per_1k_requests", "per_1k_tokens"}
    # a node credential is not an admin key
    r = tc.get("/api/admin/contributions", headers={"Authorization": f"Bearer {tokens['n1']}"})
    assert r.status_code == 401 and "admin" in r.text.lower()
    admin = {"Authorization": "Bearer rma_admin_" + "a" * 12 + "_" + "b" * 64}
    r = tc.get("/api/admin/contributions", headers=admin, params={"hours": 48})
    assert r.status_code == 200
    donors = r.json()["donors"]
    assert [d["all_time"]["requests"] for d in donors] == [3, 0] and len(donors[0]["series"]["t"]) == 48
    bad = tc.get("/api/admin/contributions", headers=admin, params={"hours": 0})
    assert bad.status_code == 422 and "hours" in bad.text
    json.dumps(r.json())


def test_rma_status_lines_render_the_figures() -> None:
    from rma_ray.contribution import WorkerContribution, render

    wc = WorkerContribution.model_validate(
        {
            "worker_id": "abc",
            "name": "pc",
            "generated_at": T0.isoformat(),
            "day_start": T0.isoformat(),
            "today": {"cpu_s": 7200, "gpu_s": 0, "requests": 1234, "tokens": 0, "credits": 3.23},
            "last_7d": {"cpu_s": 7200, "gpu_s": 0, "requests": 1234, "tokens": 0, "credits": 3.23},
            "all_time": {"cpu_s": 7200, "gpu_s": 0, "requests": 1234, "tokens": 99, "credits": 3.24},
            "weights": {"per_cpu_hour": 1, "per_gpu_hour": 10, "per_1k_requests": 1, "per_1k_tokens": 0.1},
            "future_field": "ignored",
        }
    )
    lines = render(wc)
    assert lines["given today"] == "3.23 credits: 2.00 CPU-h, 0.00 GPU-h, 1,234 requests, 0 tokens"
    assert lines["given all time"].endswith("99 tokens")


def test_rma_status_says_why_it_has_no_figures() -> None:
    from types import SimpleNamespace

    from rma_ray.contribution import status_lines
    from tests.support import free_port

    m = SimpleNamespace(coordinator_url=f"http://127.0.0.1:{free_port()}", node_token="rma_node_x_y")
    line = status_lines(m)["contribution"]
    assert line.startswith("unknown (cannot reach the coordinator")


def test_a_collector_pass_reads_the_core_and_each_edge_over_http(tmp_path: Path) -> None:
    """Ray's dashboards and a node's endpoint played by a small Starlette app (no Ray in unit tests): the core
    lists no node, the edge's node table lists one donor's node; each dashboard gets its own cluster's token,
    the node's endpoint none."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from admission.main import prepare_database
    from admission.services import metrics
    from tests.support import ServerThread

    seen: list[tuple[str, str | None]] = []
    serving: dict[str, Any] = {"host": "", "req": 5.0}

    async def sd(req: Request) -> JSONResponse:
        return JSONResponse([{"labels": {"job": "ray"}, "targets": []}])

    async def nodes(req: Request) -> JSONResponse:
        auth = req.headers.get("authorization")
        seen.append(("nodes", auth))
        host, port = serving["host"].rsplit(":", 1)
        rows = [{"raylet": {"nodeId": "n-edge", "nodeManagerAddress": host, "metricsExportPort": int(port)}}]
        return JSONResponse({"data": {"summary": rows if auth == "Bearer edge-token" else []}})

    async def scrape(req: Request) -> PlainTextResponse:
        seen.append(("metrics", req.headers.get("authorization")))
        return PlainTextResponse(node_text("127.0.0.1", req=serving["req"]))

    async def healthz(req: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/api/prometheus/sd", sd),
            Route("/nodes", nodes),
            Route("/metrics", scrape),
            Route("/healthz", healthz),
        ]
    )
    (tmp_path / "core_token").write_text("core-token\n")
    (tmp_path / "edge_token").write_text("edge-token\n")
    with ServerThread(app) as ray:
        serving["host"] = ray.url.removeprefix("http://")
        edge = {
            "name": "edge",
            "ray_address": "127.0.0.1:1",
            "dashboard_url": ray.url,
            "serve_url": ray.url,
            "token_file": str(tmp_path / "edge_token"),
        }
        state = build_state(
            Settings(
                database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                data_dir=tmp_path,
                ray_dashboard_url=ray.url,
                ray_auth_token_file=tmp_path / "core_token",
                edges=[edge],
            )
        )
        prepare_database(state)
        with state.sessions() as s, s.begin():
            w = donor("edgedonor", "n-edge")
            w.cluster = "edge"
            s.add(w)
        collector = metrics.Collector(state, interval_s=1)
        t0 = datetime.now(UTC)
        collector.collect_once(t0)  # the baseline
        serving["req"] = 12.0
        collector.collect_once(t0 + timedelta(seconds=10))
    assert rows(state.sessions)["edgedonor"] == (5.0, 0.0, 7, 0)
    assert ("nodes", "Bearer core-token") in seen and ("nodes", "Bearer edge-token") in seen
    assert ("metrics", None) in seen and not any(k == "metrics" and a for k, a in seen)
    # the Requests section reads the edge's endpoint too (the core lists none): under the edge's name
    assert (
        collector.view.error is None and collector.view.clusters == ["edge"] and collector.view.targets == 1
    )
    state.engine.dispose()


def test_a_node_two_donors_claim_goes_to_the_one_the_reconciler_saw_alive_or_to_no_one() -> None:
    from types import SimpleNamespace

    from admission.services.contributions import owners

    def w(wid: str, node: str | None, alive: bool, revoked: bool = False) -> Any:
        return SimpleNamespace(
            id=wid, ray_node_id=node, ray_alive=alive, revoked_at="x" if revoked else None, left_at=None
        )

    # B's node, matched by the reconciler; A (no node of its own, ray_alive False) claims B's id in its beats
    assert owners([w("A", "nB", False), w("B", "nB", True)]) == {"nB": "B"}
    # both seen alive (A's own node between a reconcile pass and A's next beat): credited to no one this pass
    assert owners([w("A", "nB", True), w("B", "nB", True)]) == {}
    # one claimant: its node, alive or not yet reconciled; a revoked donor is credited nothing
    assert owners([w("A", "nA", False), w("B", "nB", True, revoked=True)]) == {"nA": "A"}
