"""What the registry's request metrics cost the coordinator: one collector pass, and the figures over a busy day.

    cd /work/main && timeout 600 .venv/bin/python -m bench.request_metrics          # about 30 s on 2 cores

* parse: prometheus_client's parser over a head's metrics text (the real Serve families of
  tests/unit/data/serve_metrics padded with Ray's other families to the ~0.5 MB a head serves), in ms;
* store: one pass's rollup and cursor writes on SQLite, in ms;
* summary: GET /api/admin/metrics' figures over 48 h of per-minute rollups for 8 busy (application, route,
  status) series with latency buckets (23,040 rows), computed (ms) and served from the per-pass cache (ms),
  and the ratio between the two.

Prints figures and the load average; asserts nothing about time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from admission.main import build_state, prepare_database
from admission.models import RequestMinute
from admission.services import metrics
from rma_ray.settings import Settings

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "unit" / "data" / "serve_metrics"
SERIES = [
    ("services", "/api", "200"),
    ("services", "/api", "404"),
    ("services", "/api", "401"),
    ("services", "/api", "422"),
    ("services", "/api", "503"),
    ("llm", "/v1", "200"),
    ("llm", "/v1", "500"),
    ("llm", "/api/inference", "200"),
]


def timed(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(runs)


def head_text() -> str:
    """The Serve sample plus filler in the shape of Ray's own families (what the filter drops)."""
    serve = (SAMPLES / "2-queued.prom").read_text()
    filler = [
        "# HELP ray_grpc_server_req_process_time_ms x",
        "# TYPE ray_grpc_server_req_process_time_ms histogram",
    ]
    labels = (
        'Component="raylet",NodeAddress="10.88.0.1",SessionName="session_x",Version="2.60.0",Method="M{i}"'
    )
    while sum(map(len, filler)) + len(serve) < 500_000:
        i = len(filler)
        filler.append(f'ray_grpc_server_req_process_time_ms_bucket{{{labels.format(i=i)},le="10.0"}} {i}.0')
    return serve + "\n".join(filler) + "\n"


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rma-bench-metrics-"))
    state = build_state(Settings(database_url=f"sqlite:///{tmp / 'db.sqlite'}", data_dir=tmp))
    prepare_database(state)
    text = head_text()
    parse_ms = timed(lambda: metrics.parse(text, "10.88.0.1:6393"), 20)

    now = datetime.now(UTC)
    readings = [
        metrics.parse((SAMPLES / f"{n}.prom").read_text(), "10.88.0.1:6393")
        for n in ("0-idle", "1-after-13", "2-queued", "3-after-proxy-restart")
    ]

    def one_pass() -> None:
        nonlocal now
        now += timedelta(seconds=10)
        with state.sessions() as s, s.begin():
            metrics.store(s, readings[int(now.timestamp()) // 10 % 4], now)

    store_ms = timed(one_pass, 20)

    start = now.replace(second=0, microsecond=0)
    buckets = {
        "1.0": 0,
        "2.0": 0,
        "5.0": 1,
        "10.0": 5,
        "20.0": 9,
        "50.0": 12,
        "100.0": 15,
        "200.0": 15,
        "300.0": 15,
        "400.0": 15,
        "500.0": 15,
        "1000.0": 15,
        "2000.0": 15,
        "5000.0": 15,
        "10000.0": 15,
        "60000.0": 15,
        "120000.0": 15,
        "300000.0": 15,
        "600000.0": 15,
        "+Inf": 15,
    }
    rows = [
        dict(
            minute=start - timedelta(minutes=m),
            application=a,
            route=r,
            status_code=c,
            requests=15,
            latency_count=15,
            latency_sum_ms=300.0,
            latency_buckets=buckets,
        )
        for m in range(1, 48 * 60)
        for a, r, c in SERIES
    ]
    with state.sessions() as s, s.begin():
        s.bulk_insert_mappings(RequestMinute, rows)  # type: ignore[arg-type]
    collector = metrics.Collector(state, interval_s=10)

    def computed() -> None:
        collector.view.passes += 1  # a new pass: the cache is stale
        with state.sessions() as s:
            metrics.cached_summary(s, collector)

    def cached() -> None:
        with state.sessions() as s:
            metrics.cached_summary(s, collector)

    summary_ms = timed(computed, 5)
    cached_ms = timed(cached, 20)
    print(f"rows in the rollup table        {len(rows) + 4:>10,}")
    print(f"parse a head's metrics (0.5 MB) {parse_ms:>10.1f} ms")
    print(f"store one pass                  {store_ms:>10.1f} ms")
    print(f"summary, computed               {summary_ms:>10.1f} ms")
    print(f"summary, cached for the pass    {cached_ms:>10.3f} ms   ({summary_ms / cached_ms:,.0f}x)")
    print(f"load average                    {os.getloadavg()[0]:>10.1f}")
    state.engine.dispose()


if __name__ == "__main__":
    main()
