"""Serve request metrics: parsing, deltas across scrapes and restarts, percentiles from buckets, the API and the
registry page.

The samples in data/serve_metrics/ are real scrapes of a Ray 2.60 head's metrics endpoint (one `echo` app whose
Echo deployment has max_ongoing_requests=1), cut down to the Serve request families:
0-idle (deployed, no traffic), 1-after-13 (10 x 200, 2 x 404, 1 x 503), 2-queued (5 more 200s, then 4 slow
requests in flight: 1 at the replica, 3 queued), 3-after-proxy-restart (the slow four finished, the proxy actor
killed and restarted by Serve, 3 x 200 through the new proxy; the dead proxy's series are still exported)."""

from __future__ import annotations

import html.parser
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from admission import migrate
from admission.db import make_engine, make_sessionmaker
from admission.main import create_app
from admission.models import DeploymentLoad, MetricCursor, RequestMinute
from admission.services import metrics
from rma_ray.settings import Settings

DATA = Path(__file__).parent / "data" / "serve_metrics"
ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "admission" / "static"
TARGET = "10.88.0.1:44217"
T0 = datetime(2026, 11, 27, 9, 0, 30, tzinfo=UTC)


def sample(name: str) -> str:
    return (DATA / f"{name}.prom").read_text()


def reading(name: str, target: str = TARGET) -> metrics.Reading:
    return metrics.parse(sample(name), target)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate.upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def store(sessions, r: metrics.Reading, at: datetime) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with sessions() as s, s.begin():
        return metrics.store(s, r, at)


def totals(sessions) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        out: dict[str, int] = {}
        for row in s.query(RequestMinute):
            out[row.status_code] = out.get(row.status_code, 0) + row.requests
        return out


# parsing


def test_parse_reads_requests_latency_and_queues_from_a_real_scrape() -> None:
    r = reading("1-after-13")
    by_status = {key[3]: v for _, key, v in r.counters.values()}
    assert by_status == {"200": 10.0, "404": 2.0, "503": 1.0}
    assert {key[:3] for _, key, _ in r.counters.values()} == {("core", "echo", "/echo")}
    hists = {key[3]: h for _, key, h in r.histograms.values()}
    assert {k: h.count for k, h in hists.items()} == {"200": 10.0, "404": 2.0, "503": 1.0}
    assert hists["200"].buckets["+Inf"] == 10.0 and hists["200"].sum > 0
    assert r.load == {("core", "echo", "Echo"): [0.0, 0.0]}
    # the error counter and the router's counter count the same requests again: they are not read
    assert "ray_serve_num_http_error_requests_total" in sample("1-after-13")
    assert len(r.counters) == 3


def test_parse_sums_queued_and_ongoing_per_deployment() -> None:
    assert reading("2-queued").load == {("core", "echo", "Echo"): [3.0, 1.0]}


def test_series_ids_ignore_bucket_and_scope_labels_but_keep_the_process() -> None:
    before, after = reading("2-queued"), reading("3-after-proxy-restart")
    assert set(before.counters) < set(
        after.counters
    )  # same ids for the old proxy, new ones for the new proxy
    assert len(set(after.counters) - set(before.counters)) == 1
    other = reading("2-queued", target="10.88.0.2:44217")
    assert not set(other.counters) & set(before.counters)


def test_parse_refuses_text_that_is_not_prometheus() -> None:
    with pytest.raises(ValueError):
        metrics.parse('ray_serve_num_http_requests_total{route="/x" 1\n', TARGET)


# deltas


def test_first_pass_takes_a_baseline_then_counts_the_rise(sessions) -> None:  # type: ignore[no-untyped-def]
    assert store(sessions, reading("1-after-13"), T0)["baseline"] == 1
    assert totals(sessions) == {}  # what the cluster served before the collector existed is not counted
    out = store(sessions, reading("2-queued"), T0 + timedelta(seconds=15))
    assert out["requests"] == 5 and totals(sessions) == {"200": 5}


def test_series_born_after_the_first_pass_count_in_full(sessions) -> None:  # type: ignore[no-untyped-def]
    store(sessions, reading("0-idle"), T0)  # deployed, no request yet
    store(sessions, reading("1-after-13"), T0 + timedelta(seconds=15))
    assert totals(sessions) == {"200": 10, "404": 2, "503": 1}
    store(sessions, reading("2-queued"), T0 + timedelta(seconds=30))
    store(sessions, reading("3-after-proxy-restart"), T0 + timedelta(seconds=80))
    # 15 + the four slow ones (19 on the dead proxy) + 3 through the restarted proxy
    assert totals(sessions) == {"200": 22, "404": 2, "503": 1}
    with sessions() as s:
        rows = s.query(RequestMinute).all()
        assert sum(r.latency_count for r in rows) == 25
        assert {r.minute for r in rows} == {T0.replace(second=0), T0.replace(second=0) + timedelta(minutes=1)}


def test_the_same_scrape_twice_counts_nothing(sessions) -> None:  # type: ignore[no-untyped-def]
    store(sessions, reading("0-idle"), T0)
    store(sessions, reading("1-after-13"), T0 + timedelta(seconds=10))
    store(sessions, reading("1-after-13"), T0 + timedelta(seconds=20))
    assert totals(sessions) == {"200": 10, "404": 2, "503": 1}


def test_a_counter_that_falls_was_restarted_and_counts_from_zero(sessions) -> None:  # type: ignore[no-untyped-def]
    store(sessions, reading("0-idle"), T0)
    store(sessions, reading("2-queued"), T0 + timedelta(seconds=10))  # 15 x 200
    # the same series read again lower: its process (same labels) restarted and served 10 since
    store(sessions, reading("1-after-13"), T0 + timedelta(seconds=20))
    assert totals(sessions)["200"] == 25
    assert metrics.counter_delta(15.0, 10.0, baseline=False) == 10.0
    assert metrics.counter_delta(10.0, 15.0, baseline=False) == 5.0
    assert metrics.counter_delta(None, 7.0, baseline=True) == 0.0
    assert metrics.counter_delta(None, 7.0, baseline=False) == 7.0


def test_histogram_reset_and_bucket_deltas() -> None:
    prev = metrics.Hist({"10.0": 4, "100.0": 9, "+Inf": 10}, 10, 300.0)
    cur = metrics.Hist({"10.0": 5, "100.0": 12, "+Inf": 14}, 14, 420.0)
    d = metrics.hist_delta(prev, cur, baseline=False)
    assert (
        d is not None and d.buckets == {"10.0": 1, "100.0": 3, "+Inf": 4} and d.count == 4 and d.sum == 120.0
    )
    restarted = metrics.Hist({"10.0": 1, "100.0": 2, "+Inf": 2}, 2, 30.0)
    assert metrics.hist_delta(prev, restarted, baseline=False) == restarted
    assert metrics.hist_delta(None, cur, baseline=True) is None
    rebucketed = metrics.Hist({"50.0": 12, "+Inf": 14}, 14, 420.0)  # new bounds: a new process
    assert metrics.hist_delta(prev, rebucketed, baseline=False) == rebucketed


def test_cursors_survive_a_coordinator_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    for i, name in enumerate(("0-idle", "1-after-13")):
        engine = make_engine(url)  # a fresh process each time: nothing in memory carries over
        migrate.upgrade(engine)
        with make_sessionmaker(engine)() as s, s.begin():
            metrics.store(s, reading(name), T0 + timedelta(seconds=10 * i))
        engine.dispose()
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        assert sum(r.requests for r in s.query(RequestMinute)) == 13
        assert s.get(MetricCursor, metrics.MARKER) is not None
    engine.dispose()


def test_queues_keep_the_latest_value_and_drop_deployments_gone(sessions) -> None:  # type: ignore[no-untyped-def]
    store(sessions, reading("2-queued"), T0)
    with sessions() as s:
        (row,) = s.query(DeploymentLoad).all()
        assert (row.application, row.deployment, row.queued, row.ongoing) == ("echo", "Echo", 3.0, 1.0)
    store(sessions, reading("3-after-proxy-restart"), T0 + timedelta(seconds=10))
    with sessions() as s:
        assert [(r.queued, r.ongoing) for r in s.query(DeploymentLoad)] == [(0.0, 0.0)]
    store(sessions, metrics.Reading(), T0 + timedelta(seconds=20))
    with sessions() as s:
        assert s.query(DeploymentLoad).count() == 0


def test_prune_drops_rollups_and_cursors_past_retention(sessions) -> None:  # type: ignore[no-untyped-def]
    store(sessions, reading("0-idle"), T0 - timedelta(hours=50))
    store(sessions, reading("1-after-13"), T0 - timedelta(hours=49))
    store(sessions, reading("2-queued"), T0)
    with sessions() as s, s.begin():
        metrics.prune(s, T0, 48)
    assert totals(sessions) == {"200": 5}  # the 13 of 49 h ago are gone
    with sessions() as s:
        assert s.get(MetricCursor, metrics.MARKER) is not None
        assert all(c.seen_at >= T0 - timedelta(hours=48) for c in s.query(MetricCursor))


# percentiles


@pytest.mark.parametrize(
    ("q", "buckets", "want"),
    [
        (0.5, {"10.0": 0, "20.0": 10, "+Inf": 10}, 15.0),  # inside the bucket, linearly
        (0.5, {"10.0": 10, "+Inf": 10}, 5.0),  # the first bucket starts at 0
        (0.99, {"10.0": 50, "100.0": 99, "+Inf": 100}, 100.0),
        (0.99, {"10.0": 50, "100.0": 90, "+Inf": 100}, 100.0),  # in +Inf: the highest finite bound
        (0.5, {"1.0": 0, "+Inf": 0}, None),  # no observations
        (0.5, {}, None),
        (0.5, {"10.0": 4}, None),  # no +Inf bucket: not a complete histogram
    ],
)
def test_quantile_from_buckets(q: float, buckets: dict[str, float], want: float | None) -> None:
    got = metrics.quantile(q, buckets)
    assert got == want if want is None else math.isclose(got or -1, want)


def test_quantile_of_the_real_latency_histogram() -> None:
    buckets: dict[str, float] = {}
    for _, _, h in reading("1-after-13").histograms.values():
        metrics._add_buckets(buckets, h.buckets)
    p50, p99 = metrics.quantile(0.5, buckets), metrics.quantile(0.99, buckets)
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    bounds = sorted(float(b) for b in buckets)
    assert bounds[0] <= p99 <= bounds[-2]  # within the finite buckets


def test_summary_today_last_hour_applications_and_series(sessions) -> None:  # type: ignore[no-untyped-def]
    now = datetime(2026, 11, 27, 9, 30, 0, tzinfo=UTC)
    with sessions() as s, s.begin():
        s.add_all(
            [
                RequestMinute(
                    minute=datetime(2026, 11, 26, 23, 50, tzinfo=UTC),
                    application="echo",
                    route="/echo",
                    status_code="200",
                    requests=7,
                    latency_count=7,
                    latency_sum_ms=70,
                    latency_buckets={"10.0": 7, "+Inf": 7},
                ),
                RequestMinute(
                    minute=datetime(2026, 11, 27, 8, 0, tzinfo=UTC),
                    application="echo",
                    route="/echo",
                    status_code="200",
                    requests=90,
                    latency_count=90,
                    latency_sum_ms=900,
                    latency_buckets={"10.0": 90, "100.0": 90, "+Inf": 90},
                ),
                RequestMinute(
                    minute=datetime(2026, 11, 27, 9, 10, tzinfo=UTC),
                    application="echo",
                    route="/echo",
                    status_code="503",
                    requests=4,
                    latency_count=4,
                    latency_sum_ms=400,
                    latency_buckets={"10.0": 0, "100.0": 4, "+Inf": 4},
                ),
                RequestMinute(
                    minute=datetime(2026, 11, 27, 9, 11, tzinfo=UTC),
                    application="services",
                    route="/api",
                    status_code="404",
                    requests=6,
                    latency_count=6,
                    latency_sum_ms=60,
                    latency_buckets={"10.0": 6, "100.0": 6, "+Inf": 6},
                ),
                DeploymentLoad(application="echo", deployment="Echo", queued=3, ongoing=1, at=now),
                DeploymentLoad(application="services", deployment="ocr", queued=2, ongoing=1, at=now),
            ]
        )
    with sessions() as s:
        out = metrics.summary(s, None, now)
    assert out.day_start == datetime(2026, 11, 27, tzinfo=UTC)
    assert (out.today.requests, out.today.errors_4xx, out.today.errors_5xx) == (100, 6, 4)
    assert (out.last_hour.requests, out.last_hour.errors_4xx, out.last_hour.errors_5xx) == (10, 6, 4)
    assert out.last_hour.p99_ms is not None and 10 < out.last_hour.p99_ms <= 100
    assert out.today.p50_ms is not None and out.today.p50_ms <= 10
    assert [(a.application, a.requests) for a in out.applications] == [("echo", 94), ("services", 6)]
    assert out.queued_total == 5 and [q.deployment for q in out.queues] == ["Echo", "ocr"]
    assert out.collector.running is False and "no Ray head" in (out.collector.error or "")
    series = out.series
    assert series.step_s == 600 and len(series.t) == 144 and series.t[-1] == int(now.timestamp())
    assert sum(series.requests) == 107 and sum(series.errors) == 10  # yesterday 23:50 is within 24 h
    i = series.t.index(int(datetime(2026, 11, 27, 9, 10, tzinfo=UTC).timestamp()))
    assert series.requests[i] == 10 and series.errors[i] == 10
    assert series.p99_ms[i] is not None and series.p50_ms[0] is None
    with sessions() as s:
        hourly = metrics.summary(s, None, now, step_s=3600)
    assert len(hourly.series.t) == 24 and sum(hourly.series.requests) == 107


# the API and the page


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        data_dir=tmp_path,
        admin_key="rma_admin_" + "a" * 12 + "_" + "b" * 64,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def admin(c: TestClient) -> dict[str, str]:
    return {"Authorization": "Bearer rma_admin_" + "a" * 12 + "_" + "b" * 64}


def test_metrics_api_needs_an_admin_and_answers_the_figures(client: TestClient) -> None:
    assert client.get("/api/admin/metrics").status_code == 401
    assert client.get("/registry/metrics").status_code == 401
    r = client.get("/api/admin/metrics", headers=admin(client))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["today"] == {"requests": 0, "errors_4xx": 0, "errors_5xx": 0, "p50_ms": None, "p99_ms": None}
    assert body["queues"] == [] and len(body["series"]["t"]) == 144
    assert body["collector"]["running"] is False
    assert (
        len(client.get("/api/admin/metrics?step_s=3600", headers=admin(client)).json()["series"]["t"]) == 24
    )
    for bad_step in ("7", "420", "abc"):
        bad = client.get(f"/api/admin/metrics?step_s={bad_step}", headers=admin(client))
        assert bad.status_code == 422 and "step_s" in bad.json()["error"]["message"], bad.text


class _Refs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "action", "data", "poster")]


EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+|@import|url\(\s*['"]?(?:https?:)?//""", re.I)


def test_registry_page_loads_nothing_from_outside_and_the_chart_library_is_served(client: TestClient) -> None:
    login = client.post(
        "/registry/login",
        data={"admin_key": "rma_admin_" + "a" * 12 + "_" + "b" * 64},
        follow_redirects=False,
    )
    assert login.status_code == 303
    page = client.get("/registry")
    assert page.status_code == 200 and 'id="requests"' in page.text and 'id="requests-chart"' in page.text
    refs = _Refs()
    refs.feed(page.text)
    assert (
        "/static/vendor/uplot/uPlot.iife.min.js" in refs.refs
        and "/static/vendor/uplot/uPlot.min.css" in refs.refs
    )
    assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs.refs), refs.refs
    assert not EXTERNAL.search(page.text.replace('href="/', "")), "the page names an outside URL"
    for path in ("registry.js", "registry.css", "vendor/uplot/uPlot.min.css"):
        assert not EXTERNAL.search((STATIC / path).read_text()), path
    js = (STATIC / "vendor/uplot/uPlot.iife.min.js").read_text()
    # the library's only URL is its banner comment; it fetches and imports nothing
    assert EXTERNAL.findall(js) == ["https://github.com"] and js.startswith(
        "/*! https://github.com/leeoniya/uPlot"
    )
    assert not re.search(r"\bfetch\(|XMLHttpRequest|importScripts|\bimport\(", js)
    for path, kind in (
        ("/static/vendor/uplot/uPlot.iife.min.js", "javascript"),
        ("/static/vendor/uplot/uPlot.min.css", "text/css"),
        ("/static/registry.js", "javascript"),
    ):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    served = client.get("/static/vendor/uplot/uPlot.iife.min.js").content
    assert served == (STATIC / "vendor/uplot/uPlot.iife.min.js").read_bytes()
    r = client.get("/registry/metrics")
    assert r.status_code == 200 and r.json()["today"]["requests"] == 0


def test_the_vendored_library_ships_in_the_wheel() -> None:
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "admission"
    ]
    vendored = [
        p.relative_to(ROOT / "admission").as_posix() for p in (STATIC / "vendor").rglob("*") if p.is_file()
    ]
    assert {"static/vendor/uplot/uPlot.iife.min.js", "static/vendor/uplot/LICENSE"} <= set(vendored)
    missing = [
        f for f in vendored if not any(fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns)
    ]
    assert missing == [], f"package-data does not ship {missing}"


def test_summaries_are_computed_once_per_collector_pass(tmp_path: Path) -> None:
    from admission.main import build_state, prepare_database

    state = build_state(Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path))
    prepare_database(state)
    collector = metrics.Collector(state, interval_s=10)  # not started: passes are counted by hand here
    with state.sessions() as s:
        first = metrics.cached_summary(s, collector)
        assert metrics.cached_summary(s, collector) is first
        assert metrics.cached_summary(s, collector, step_s=3600) is not first
    with state.sessions() as s, s.begin():
        s.add(
            RequestMinute(
                minute=datetime.now(UTC).replace(second=0, microsecond=0),
                application="echo",
                route="/echo",
                status_code="200",
                requests=3,
                latency_count=3,
                latency_sum_ms=3.0,
                latency_buckets={"10.0": 3, "+Inf": 3},
            )
        )
    collector.view.passes += 1
    with state.sessions() as s:
        again = metrics.cached_summary(s, collector)
    assert again is not first and again.today.requests == 3 and again.collector.interval_s == 10
    state.engine.dispose()


def test_a_collector_pass_over_http(tmp_path: Path) -> None:
    """Discovery and scraping over real HTTP, Ray's two endpoints played by a small Starlette app serving the real
    scrapes (no Ray in unit tests): the cluster token goes to the dashboard only, a dead endpoint is a note."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from admission.main import build_state, prepare_database
    from tests.support import ServerThread, free_port

    seen: list[tuple[str, str | None]] = []
    serving: dict[str, Any] = {"name": "0-idle", "host": "", "dead": False}
    dead = f"127.0.0.1:{free_port()}"

    async def sd(req: Request) -> JSONResponse:
        seen.append(("sd", req.headers.get("authorization")))
        targets = [serving["host"], *([dead] if serving["dead"] else [])]
        return JSONResponse([{"labels": {"job": "ray"}, "targets": targets}])

    async def scrape(req: Request) -> PlainTextResponse:
        seen.append(("metrics", req.headers.get("authorization")))
        return PlainTextResponse(sample(serving["name"]))

    async def healthz(req: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/api/prometheus/sd", sd), Route("/metrics", scrape), Route("/healthz", healthz)]
    )
    token = tmp_path / "cluster_token"
    token.write_text("t0ken-for-the-dashboard\n")
    with ServerThread(app) as ray:
        serving["host"] = ray.url.removeprefix("http://")
        state = build_state(
            Settings(
                database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                data_dir=tmp_path,
                ray_dashboard_url=ray.url,
                ray_auth_token_file=token,
            )
        )
        prepare_database(state)
        collector = metrics.Collector(state, interval_s=1)
        assert collector.collect_once()["baseline"] == 1  # every endpoint answered: the first read is done
        serving["name"], serving["dead"] = "1-after-13", True  # and then a node is gone, still listed
        assert collector.collect_once()["requests"] == 13
    assert collector.view.targets == 2 and collector.view.error is None
    assert len(collector.view.unreachable) == 1 and collector.view.unreachable[0].startswith(dead)
    assert ("sd", "Bearer t0ken-for-the-dashboard") in seen and ("metrics", None) in seen
    assert not any(kind == "metrics" and auth for kind, auth in seen)
    with state.sessions() as s:
        out = metrics.summary(s, collector)
    assert out.today.requests == 13 and out.collector.running is False and out.collector.targets == 2
    # Ray's dashboard gone: the pass says so and writes nothing
    assert collector.collect_once() == {} and "cannot list Ray's metrics endpoints" in (
        collector.view.error or ""
    )
    state.engine.dispose()
