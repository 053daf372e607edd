"""Serve request metrics end to end: a real token-auth Ray head with Serve and a tiny app, a coordinator wired
to it (its reconciler and metrics collector running), real HTTP requests through Serve's proxy, and the figures
read back from GET /api/admin/metrics and the registry page. Plus the rollups on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from admission import migrate
from admission.db import make_engine, make_sessionmaker
from admission.main import build_state, create_app, prepare_database
from admission.models import DeploymentLoad, RequestMinute
from admission.services import metrics
from admission.state import AppState
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.integration.conftest import make_settings
from tests.support import ServerThread, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "tests" / "unit" / "data" / "serve_metrics"

# one app, `echo`, shaped like the services app and served as `rma up` serves it (HAProxy in front of the ingress
# replicas): an ingress (Front) that answers at once with the status asked for, and calls a deployment (Slow)
# through a handle for /echo/slow; Slow takes one request at a time, so that a burst waits in the router of
# Front's handle (Serve's deployment_queued_queries gauge, exported from Front's replica)
APPS = """
import asyncio
from ray import serve
from starlette.responses import PlainTextResponse

@serve.deployment(max_ongoing_requests=1, max_queued_requests=-1, ray_actor_options={"num_cpus": 0})
class Slow:
    async def __call__(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Front:
    def __init__(self, slow):
        self.slow = slow

    async def __call__(self, request):
        if request.url.path.endswith("/slow"):
            return PlainTextResponse(await self.slow.remote(float(request.query_params.get("s", 0))))
        return PlainTextResponse("ok", status_code=int(request.query_params.get("status", 200)))
"""


@dataclass
class Pool:
    serve_url: str
    coordinator_url: str
    admin_key: str
    state: AppState

    def metrics(self) -> dict[str, Any]:
        r = httpx.get(
            self.coordinator_url + "/api/admin/metrics",
            timeout=30,
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def app(self, m: dict[str, Any], name: str) -> dict[str, Any]:
        return next(
            (a for a in m["applications"] if a["application"] == name),
            {"requests": 0, "errors_4xx": 0, "errors_5xx": 0},
        )

    def metrics_when(self, cond: Any) -> Any:
        """The metrics once `cond(metrics)` holds, else None (for wait_for)."""
        m = self.metrics()
        return m if cond(m) else None


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A one-node Ray head (token auth, metrics exported every second instead of every 10 s) with Serve and the
    app, and a coordinator wired to it scraping every second: ~40 s on a quiet 2-core box, ~100 s at load 15."""
    root = tmp_path_factory.mktemp("reqmetrics")
    token = root / "cluster_token"
    read_or_create_secret(token)
    ip = local_ip_towards("192.0.2.1")
    gcs, dash, http_port = free_port(ip), free_port(ip), free_port(ip)
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"rm-{os.getpid()}"),
            labels={"rma.io/tier": "head", "rma.io/trusted": "true"},
            gcs_port=gcs,
            dashboard_port=dash,
            num_cpus=2,
            drain_timeout_s=2,
            env={"RAY_metrics_report_interval_ms": "1000"},
        ),
        root / "head.log",
    )
    server = None
    state = None
    try:
        head.start()
        head.wait_started(180)
        state = build_state(
            make_settings(
                f"sqlite:///{root / 'coordinator.db'}",
                root / "coord",
                ray_dashboard_url=f"http://{ip}:{dash}",
                ray_auth_token_file=token,
                reconcile_interval_s=5,
                metrics_interval_s=1,
            )
        )
        admin_key = prepare_database(state)
        assert admin_key
        server = ServerThread(create_app(state=state)).__enter__()
        env = {**ray_env(token), "HOME": str(root / "home"), "PYTHONPATH": str(REPO)}
        script = APPS + textwrap.dedent(f"""
            import ray
            ray.init(address="{ip}:{gcs}", namespace="rma", logging_level="ERROR", log_to_driver=False)
            from rma_ray.serve_admin import start
            print(start("{ip}", {http_port}))  # as `rma up` starts Serve: HAProxy in front of the ingress replicas
            serve.run(Front.bind(Slow.bind()), name="echo", route_prefix="/echo")
            print("deployed")
        """)
        r = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0 and "deployed" in r.stdout, r.stderr[-3000:]
        p = Pool(f"http://{ip}:{http_port}", server.url, admin_key, state)
        # HAProxy answers 404 itself until it has reloaded with the new app's backend; the first 200 is the one
        # request of the fixture that the echo app counts
        wait_for(
            lambda: httpx.get(p.serve_url + "/echo", timeout=10).status_code == 200,
            timeout=60,
            what="the echo app through Serve's HTTP port",
        )
        # the collector has read the head's endpoint at least once: what follows is counted, not a baseline
        wait_for(
            lambda: p.metrics()["collector"]["at"] and state.reconciler.collector.view.passes >= 2,
            timeout=60,
            what="the metrics collector's first passes",
        )
        yield p
    finally:
        if server is not None:
            server.__exit__(None, None, None)  # stops the reconciler and the collector with the app
        # nothing on the head needs draining (the echo app's requests are done): every process at once, GCS
        # last, not `ray start`'s stop one by one (module teardown 5.9 -> 2.3 s, no raylet or HAProxy left)
        head.stop_all(grace=5)
        shutil.rmtree(head.spec.temp_dir, ignore_errors=True)
        if state is not None:
            state.engine.dispose()


def _echo_counts(pool: Pool, m: dict[str, Any]) -> tuple[int, int, int]:
    a = pool.app(m, "echo")
    return a["requests"], a["errors_4xx"], a["errors_5xx"]


def _settled_echo_counts(pool: Pool) -> tuple[int, int, int]:
    """The echo app's counts once three collector passes in a row agree (what other tests of the module sent,
    in whichever order they ran, has all been counted)."""
    view = pool.state.reconciler.collector.view

    def settled() -> tuple[int, int, int] | None:
        first, p0 = _echo_counts(pool, pool.metrics()), view.passes
        wait_for(lambda: view.passes >= p0 + 3, timeout=30, interval=0.2, what="three collector passes")
        return first if _echo_counts(pool, pool.metrics()) == first else None

    return wait_for(settled, timeout=120, interval=0.1, what="the echo app's counts to settle")


@pytest.mark.ray
def test_requests_errors_and_latency_reach_the_api(pool: Pool) -> None:
    base = _settled_echo_counts(pool)  # the fixture's probe, and the slow calls of tests that ran before
    with httpx.Client(base_url=pool.serve_url, timeout=60) as c:
        codes = [c.get("/echo").status_code for _ in range(30)]
        codes += [c.get("/echo", params={"status": s}).status_code for s in (404, 404, 429, 500, 503)]
    assert codes == [200] * 30 + [404, 404, 429, 500, 503]

    m = wait_for(
        lambda: pool.metrics_when(lambda m: pool.app(m, "echo")["requests"] >= base[0] + 35),
        timeout=60,
        interval=1,
        what="35 more echo requests in /api/admin/metrics",
    )
    echo = pool.app(m, "echo")
    assert echo["cluster"] == "core"  # served by the core's Serve ingress (this pool has no edge)
    # exactly once (the collector scraped many times while the counts settled): these 35 on top of the baseline
    assert _echo_counts(pool, m) == (base[0] + 35, base[1] + 3, base[2] + 2), (base, echo)
    assert m["today"]["requests"] >= 35 and m["last_hour"]["requests"] >= 35
    for span in ("today", "last_hour"):
        p50, p99 = m[span]["p50_ms"], m[span]["p99_ms"]
        assert p50 is not None and p99 is not None and 0 < p50 <= p99, m[span]
    assert echo["p50_ms"] is not None
    series = m["series"]
    assert len(series["t"]) == 144 and sum(series["requests"]) >= 35 and sum(series["errors"]) >= 5
    assert any(v is not None for v in series["p99_ms"])
    c = m["collector"]
    assert c["running"] and c["error"] is None and c["targets"] > len(c["unreachable"]), c
    assert c["clusters"] == ["core"]


@pytest.mark.ray
def test_queued_now_per_deployment(pool: Pool) -> None:
    slow = pool.serve_url + "/echo/slow"
    # Front's handle to Slow starts its router (and its gauges) on the first call
    assert httpx.get(slow, params={"s": 0}, timeout=60).text == "done"
    # With HAProxy in front (as `rma up` runs Serve) requests for the ingress wait in HAProxy, not in a Serve
    # router: the deployments reached by handle (the services behind the gateway) are the ones with a queue gauge
    m = wait_for(
        lambda: pool.metrics_when(
            lambda m: ("echo", "Slow") in {(q["application"], q["deployment"]) for q in m["queues"]}
        ),
        timeout=60,
        interval=1,
        what="a queue gauge for the deployment behind the ingress",
    )
    assert all(q["queued"] == 0 for q in m["queues"])

    answers: list[str] = []
    burst = [
        threading.Thread(target=lambda: answers.append(httpx.get(slow, params={"s": 2.5}, timeout=120).text))
        for _ in range(3)
    ]
    for t in burst:
        t.start()
    try:
        # one request at Slow's replica, the others waiting for it in the router of Front's handle
        def queued() -> dict[str, Any] | None:
            q = next(q for q in pool.metrics()["queues"] if q["deployment"] == "Slow")
            return q if q["queued"] >= 1 and q["ongoing"] >= 1 else None

        q = wait_for(queued, timeout=15, interval=0.5, what="the slow deployment's queue to show the burst")
        assert q["application"] == "echo"
        assert pool.metrics()["queued_total"] >= 1
    finally:
        for t in burst:
            t.join(120)
    assert answers == ["done"] * 3
    wait_for(
        lambda: next(q for q in pool.metrics()["queues"] if q["deployment"] == "Slow")["queued"] == 0,
        timeout=40,
        interval=1,
        what="the queue to drain",
    )


@pytest.fixture(scope="module")
def slow_called(pool: Pool) -> Pool:
    """Slow has answered once through Front's handle and the collector has seen its queue gauge and a request:
    what the page tests show, whichever tests ran before them (or none, with -k)."""
    assert httpx.get(pool.serve_url + "/echo/slow", params={"s": 0}, timeout=60).text == "done"
    wait_for(
        lambda: pool.metrics_when(
            lambda m: m["today"]["requests"] >= 1 and any(q["deployment"] == "Slow" for q in m["queues"])
        ),
        timeout=60,
        interval=1,
        what="Slow's queue gauge and a counted request in /api/admin/metrics",
    )
    return pool


@pytest.mark.ray
def test_registry_page_shows_the_requests_section(slow_called: Pool) -> None:
    pool = slow_called
    with httpx.Client(base_url=pool.coordinator_url, timeout=30) as c:
        r = c.post("/registry/login", data={"admin_key": pool.admin_key}, follow_redirects=True)
        assert r.status_code == 200 and str(r.url).endswith("/registry")  # followed the redirect
        page = r.text
        m = c.get("/registry/metrics").json()
    assert 'id="requests-chart"' in page and "/static/vendor/uplot/uPlot.iife.min.js" in page
    assert f'id="req-today">{m["today"]["requests"]:,}<' in page
    assert 'data-deployment="echo/Slow"' in page
    assert "Scraped" in page and "Ray metrics endpoint" in page


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_rollups_and_summary_on_both_databases(db_url: str) -> None:
    """The collector's writes and the API's reads on each database, from the real scrapes in the unit data."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    now = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)  # the clock, injected: the same day whenever this runs
    t0 = now - timedelta(minutes=3)
    for i, name in enumerate(("0-idle", "1-after-13", "2-queued", "3-after-proxy-restart")):
        with sessions() as s, s.begin():
            metrics.store(
                s,
                metrics.parse((SAMPLES / f"{name}.prom").read_text(), "10.88.0.1:44217"),
                t0 + timedelta(seconds=40 * i),
            )
        if name == "2-queued":
            with sessions() as s:
                assert [(r.queued, r.ongoing) for r in s.query(DeploymentLoad)] == [(3.0, 1.0)]
    with sessions() as s:
        assert sum(r.requests for r in s.query(RequestMinute)) == 25
        out = metrics.summary(s, None, now=now)
        next_day = metrics.summary(s, None, now=datetime(2026, 3, 15, 0, 30, tzinfo=UTC))
    assert (out.today.requests, out.today.errors_4xx, out.today.errors_5xx) == (25, 2, 1)
    assert out.last_hour.requests == 25 and out.last_hour.p99_ms is not None
    assert sum(out.series.requests) == 25
    # past midnight UTC the minutes are yesterday's: not today, still in the 24 h series
    assert next_day.today.requests == 0 and next_day.last_hour.requests == 0
    assert sum(next_day.series.requests) == 25
    with sessions() as s, s.begin():
        metrics.prune(s, now + timedelta(hours=49), 48)
    with sessions() as s:
        assert s.query(RequestMinute).count() == 0
    engine.dispose()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.ray
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (`make test` installs it)")
def test_registry_page_draws_the_chart_in_a_browser(slow_called: Pool) -> None:
    """Headless Chromium (~2 s): the figures fill in, uPlot draws its canvas, nothing loads from elsewhere; a
    screenshot goes to artifacts/registry-requests.png."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import ARTIFACTS

    pool = slow_called
    from tests.integration.test_registry_page import ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            asked: list[str] = []
            page.on("request", lambda req: asked.append(req.url))
            page.goto(pool.coordinator_url + "/registry/login")
            page.fill("#admin_key", pool.admin_key)
            page.click("button[type=submit]")
            page.wait_for_url(pool.coordinator_url + "/registry")
            page.wait_for_selector("#requests-chart canvas", timeout=20_000)
            today = pool.metrics()["today"]["requests"]
            assert today >= 1  # at least the slow call of the fixture
            # a function with an argument, never an expression string: Playwright evals a string in the page
            # when it has to poll, which the registry's CSP (no unsafe-eval) refuses
            page.wait_for_function(
                "want => document.getElementById('req-today').textContent === want",
                arg=f"{today:,}",
                timeout=20_000,
            )
            assert page.locator("#queues tr[data-deployment='echo/Slow'][data-cluster='core']").count() == 1
            # the per-app rows, redrawn by the script from /registry/metrics, name the cluster that served them
            echo = page.locator("#request-apps tr[data-app='core/echo']")
            assert (
                echo.locator("td.cluster").inner_text() == "core"
                and int(echo.get_attribute("data-requests")) >= 1
            )
            assert page.locator(".u-legend").inner_text().count("requests") == 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#requests").screenshot(path=str(ARTIFACTS / "registry-requests.png"))
        finally:
            browser.close()
    assert asked and all(u.startswith(pool.coordinator_url) for u in asked), asked


@dataclass
class Ledger:
    pool: Pool
    donor: str  # worker id of the donor whose node is the head's (it served the echo requests)
    idle: str  # a donor whose node is not in the cluster
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def ledger(pool: Pool) -> Ledger:
    """Two donors in the registry: one whose Ray node id is this cluster's only node (the head, so the echo
    replicas' requests and Ray's processes there are its work), one with a node no longer in Ray. Then
    requests through Serve, and the ledger attributes CPU and requests to the first (~5-20 s)."""
    from admission.models import Worker
    from admission.services import contributions
    from rma_ray import credentials

    with httpx.Client(timeout=10) as http:
        node_of = contributions.discover_nodes(pool.state, http)
    assert len(node_of) == 1, node_of  # the head's endpoint, from the dashboard's node table
    (head_node,) = node_of.values()
    tokens: dict[str, str] = {}
    with pool.state.sessions() as s, s.begin():
        for name, node in (("ledger-donor", head_node), ("ledger-idle", "f" * 56)):
            m = credentials.mint(credentials.Kind.NODE)
            s.add(
                Worker(
                    id=m.id,
                    name=name,
                    tier="service",
                    capabilities={},
                    labels={},
                    node_token_hash=m.hash,
                    ray_node_id=node,
                )
            )
            tokens[name] = m.token
    ids = {name: t.split("_")[2] for name, t in tokens.items()}
    with httpx.Client(base_url=pool.serve_url, timeout=60) as c:
        assert [c.get("/echo").status_code for _ in range(10)] == [200] * 10

    def attributed() -> dict[str, Any] | None:
        r = httpx.get(
            pool.coordinator_url + "/api/admin/contributions",
            headers={"Authorization": f"Bearer {pool.admin_key}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        mine = next(d for d in r.json()["donors"] if d["worker_id"] == ids["ledger-donor"])
        return mine if mine["all_time"]["requests"] >= 10 and mine["all_time"]["cpu_s"] > 0 else None

    wait_for(attributed, timeout=120, interval=1, what="requests and CPU-seconds attributed to the donor")
    return Ledger(pool, ids["ledger-donor"], ids["ledger-idle"], tokens)


@pytest.mark.ray
def test_the_ledger_credits_the_node_that_did_the_work(ledger: Ledger) -> None:
    pool = ledger.pool
    admin = {"Authorization": f"Bearer {pool.admin_key}"}
    donors = httpx.get(pool.coordinator_url + "/api/admin/contributions", headers=admin, timeout=30).json()
    by_id = {d["worker_id"]: d for d in donors["donors"]}
    mine, idle = by_id[ledger.donor], by_id[ledger.idle]
    assert mine["all_time"]["requests"] >= 10 and mine["all_time"]["cpu_s"] > 0
    assert mine["all_time"]["gpu_s"] == 0 and mine["all_time"]["credits"] > 0  # no GPU here
    assert mine["today"]["requests"] == mine["all_time"]["requests"]
    assert sum(mine["series"]["requests"]) == mine["all_time"]["requests"]
    assert idle["all_time"] == {"cpu_s": 0.0, "gpu_s": 0.0, "requests": 0, "tokens": 0, "credits": 0.0}
    assert [d["worker_id"] for d in donors["donors"]].index(ledger.donor) == 0  # the leaderboard's top
    # each donor's node credential sees its own figures, and no admin route
    for name, wid in (("ledger-donor", ledger.donor), ("ledger-idle", ledger.idle)):
        node = {"Authorization": f"Bearer {ledger.tokens[name]}"}
        own = httpx.get(pool.coordinator_url + "/api/worker/contribution", headers=node, timeout=30)
        assert own.status_code == 200 and own.json()["worker_id"] == wid, own.text
        assert own.json()["all_time"]["requests"] == by_id[wid]["all_time"]["requests"]
        denied = httpx.get(pool.coordinator_url + "/api/admin/contributions", headers=node, timeout=30)
        assert denied.status_code == 401, denied.text


@pytest.mark.ray
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (`make test` installs it)")
def test_registry_page_shows_the_contributors_in_a_browser(ledger: Ledger) -> None:
    """Headless Chromium (~2 s): the Contributors leaderboard, the donor that worked first with its sparkline
    drawn inline; a screenshot goes to artifacts/registry-contributors.png."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import ARTIFACTS
    from tests.integration.test_registry_page import ARGS

    pool = ledger.pool
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(pool.coordinator_url + "/registry/login")
            page.fill("#admin_key", pool.admin_key)
            page.click("button[type=submit]")
            page.wait_for_url(pool.coordinator_url + "/registry")
            rows = page.locator("#contributors-table tbody tr")
            assert rows.first.get_attribute("data-contributor") == ledger.donor
            top = page.locator(f"#contributors tr[data-contributor='{ledger.donor}']")
            assert int(top.get_attribute("data-requests") or 0) >= 10
            assert float(top.get_attribute("data-cpu-s") or 0) > 0
            assert page.locator(f"#contributors tr[data-contributor='{ledger.idle}']").get_attribute(
                "data-credits"
            ) == ("0.0")
            line = top.locator("svg.sparkline polyline")
            assert len((line.get_attribute("points") or "").split()) == 24
            box = top.locator("svg.sparkline").bounding_box()
            assert box is not None and box["width"] > 0 and box["height"] > 0  # drawn, not hidden
            assert "per CPU-hour" in page.inner_text("#credit-weights")
            # the section lives in the refreshed fragment: it is still there after a refresh
            page.wait_for_function(
                "prev => document.querySelector('#generated-at').textContent !== prev",
                arg=page.inner_text("#generated-at"),
                timeout=20_000,
            )
            assert page.locator(f"#contributors tr[data-contributor='{ledger.donor}']").count() == 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#contributors").screenshot(path=str(ARTIFACTS / "registry-contributors.png"))
        finally:
            browser.close()


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_the_ledger_on_both_databases(db_url: str) -> None:
    """The ledger's writes, rollup and reads on each database, from the unit tests' node endpoint text."""
    from admission.models import ContributionMinute, Worker
    from admission.services import contributions
    from tests.unit.test_contributions import node_text

    engine = make_engine(db_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    now = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
    target = "10.88.0.5:9100"
    with sessions() as s, s.begin():
        s.add(
            Worker(
                id="ledgerdb",
                name="pc",
                tier="service",
                capabilities={},
                labels={},
                node_token_hash="0",
                ray_node_id="n1",
            )
        )
    for i, req in enumerate((5, 9, 30)):  # a baseline, then +4 and +21; 50 % of a core for 2 x 20 s
        at = now - timedelta(hours=50) + timedelta(seconds=20 * i)
        with sessions() as s, s.begin():
            reading = {target: contributions.parse(node_text(req=req), target)}
            contributions.store(s, reading, {target: "n1"}, at)
    state: Any = SimpleNamespace(settings=make_settings(db_url, Path("/nonexistent")))  # weights only
    with sessions() as s, s.begin():
        contributions.maintain(s, now, state.settings)
    with sessions() as s:
        assert s.query(ContributionMinute).count() == 1  # two minutes 50 h ago, rolled into their hour
        out = contributions.overview(state, s, now=now, hours=72)
    (d,) = out.donors
    assert (d.all_time.requests, d.all_time.cpu_s) == (4 + 21, 20.0)
    assert sum(d.series.requests) == 25 and d.today.requests == 0
    engine.dispose()
