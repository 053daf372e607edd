"""Ray Serve request metrics for the registry: requests today, errors, p50/p99, queues per deployment, 24 h series.

A collector thread on the head scrapes every Ray node's metrics endpoint (the targets Ray publishes for Prometheus
at the dashboard's `/api/prometheus/sd`), parses the Prometheus text with prometheus_client's parser and keeps
per-minute rollups in the coordinator's database:

- requests per application, route and status code: `ray_serve_num_http_requests_total`, recorded by Serve's
  HTTP ingress (the Python proxy, or with HAProxy in front, as `rma up` runs it, each ingress replica: a request
  is recorded by exactly one of them);
- latency: `ray_serve_http_request_latency_ms` from the same place, stored as bucket deltas, so that p50/p99
  over any span are estimated from buckets the way Prometheus' `histogram_quantile` does;
- queued and ongoing requests now, per deployment: the routers' `ray_serve_deployment_queued_queries` and
  `ray_serve_num_ongoing_requests_at_replicas`, summed over the handles that call the deployment.

Counters are cumulative per process. A delta is the rise since the cursor kept for that series; a fall means the
process restarted and its whole new value is new; a series first seen after the collector's first pass is new
traffic (a restarted proxy or replica has a new WorkerId label). Cursors are written in the same transaction as
the rollups, so a restarted coordinator neither loses nor double-counts. The very first pass against a database with no
cursors takes a baseline: a running cluster's history before the collector existed is not today's traffic.

The same pass feeds the donors' contribution ledger (admission.services.contributions) from the same scrapes,
in the same transaction.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from admission import schemas
from admission.models import DeploymentLoad, MetricCursor, RequestMinute, utcnow
from admission.services import contributions
from admission.state import AppState

log = logging.getLogger("rma.metrics")

REQUESTS = "ray_serve_num_http_requests"  # the family's name as parsed (the `_total` suffix is the sample's)
LATENCY = "ray_serve_http_request_latency_ms"
QUEUED = "ray_serve_deployment_queued_queries"
ONGOING = "ray_serve_num_ongoing_requests_at_replicas"
FAMILIES = (REQUESTS, LATENCY, QUEUED, ONGOING)
# labels that say nothing about which series it is (OpenTelemetry's scope) or split one histogram into buckets
_NOT_IDENTITY = {"le", "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
MARKER = "collector-started"
MAX_SCRAPE_BYTES = 64 * 1024 * 1024
QUANTILES = (0.5, 0.99)
LOAD_STALE = timedelta(minutes=5)

Key = tuple[str, str, str]  # application, route, status code


@dataclass
class Hist:
    buckets: dict[str, float]  # upper bound as Ray writes it ("10.0", "+Inf") -> cumulative count
    count: float
    sum: float

    def as_json(self) -> dict[str, Any]:
        return {"b": self.buckets, "n": self.count, "s": self.sum}

    @classmethod
    def from_json(cls, v: Mapping[str, Any]) -> Hist:
        return cls(dict(v.get("b") or {}), float(v.get("n", 0)), float(v.get("s", 0)))


@dataclass
class Reading:
    """Cumulative values of one scrape of one or more targets: series id -> (target, key, value)."""

    counters: dict[str, tuple[str, Key, float]] = field(default_factory=dict)
    histograms: dict[str, tuple[str, Key, Hist]] = field(default_factory=dict)
    load: dict[tuple[str, str], list[float]] = field(
        default_factory=dict
    )  # (app, deployment) -> [queued, ongoing]

    def merge(self, other: Reading) -> None:
        self.counters.update(other.counters)
        self.histograms.update(other.histograms)
        for k, (q, o) in other.load.items():
            mine = self.load.setdefault(k, [0.0, 0.0])
            mine[0] += q
            mine[1] += o


def _series_id(target: str, family: str, labels: Mapping[str, str]) -> str:
    ident = "|".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _NOT_IDENTITY)
    return hashlib.sha256(f"{target}|{family}|{ident}".encode()).hexdigest()


def _key(labels: Mapping[str, str]) -> Key:
    return (
        labels.get("application", "")[:128],
        labels.get("route", "")[:255],
        labels.get("status_code", "")[:8],
    )


def _wanted(text: str) -> str:
    """Only the lines of the families we read: a head's endpoint serves ~0.5 MB, mostly Ray's own metrics."""
    heads = tuple(p for f in FAMILIES for p in (f, f"# HELP {f}", f"# TYPE {f}"))
    return "\n".join(line for line in text.splitlines() if line.startswith(heads)) + "\n"


def parse(text: str, target: str) -> Reading:
    """The Serve request families in one target's Prometheus text (prometheus_client's parser)."""
    out = Reading()
    hists: dict[str, tuple[Key, Hist]] = {}
    for fam in text_string_to_metric_families(_wanted(text)):
        if fam.name == REQUESTS:
            for s in fam.samples:
                if s.name.endswith("_total") and not s.labels.get("route", "").startswith("/-/"):
                    out.counters[_series_id(target, fam.name, s.labels)] = (target, _key(s.labels), s.value)
        elif fam.name == LATENCY:
            for s in fam.samples:
                if s.labels.get("route", "").startswith("/-/"):
                    continue
                sid = _series_id(target, fam.name, s.labels)
                h = hists.setdefault(sid, (_key(s.labels), Hist({}, 0.0, 0.0)))[1]
                if s.name.endswith("_bucket"):
                    h.buckets[s.labels["le"]] = s.value
                elif s.name.endswith("_count"):
                    h.count = s.value
                elif s.name.endswith("_sum"):
                    h.sum = s.value
        elif fam.name in (QUEUED, ONGOING):
            col = 0 if fam.name == QUEUED else 1
            for s in fam.samples:
                k = (s.labels.get("application", "")[:128], s.labels.get("deployment", "")[:128])
                if math.isfinite(s.value):
                    out.load.setdefault(k, [0.0, 0.0])[col] += s.value
    out.histograms = {sid: (target, key, h) for sid, (key, h) in hists.items()}
    return out


def counter_delta(prev: float | None, cur: float, baseline: bool) -> float:
    if prev is None:
        return 0.0 if baseline else cur
    return cur if cur < prev else cur - prev  # a fall: the process restarted and counts from zero again


def hist_delta(prev: Hist | None, cur: Hist, baseline: bool) -> Hist | None:
    if prev is None:
        return None if baseline else cur
    if (
        cur.count < prev.count
        or set(cur.buckets) != set(prev.buckets)  # restarted, or rebuilt with new bounds
        or any(v < prev.buckets[le] for le, v in cur.buckets.items())
    ):
        return cur
    return Hist(
        {le: v - prev.buckets.get(le, 0.0) for le, v in cur.buckets.items()},
        cur.count - prev.count,
        max(0.0, cur.sum - prev.sum),
    )


def quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """Estimate the q-quantile from cumulative bucket counts, interpolating linearly inside the bucket (as
    Prometheus' histogram_quantile); a rank in the +Inf bucket answers the highest finite bound."""
    items = sorted((float(le), c) for le, c in buckets.items())
    if not items or not math.isinf(items[-1][0]):
        return None
    running, fixed = 0.0, []
    for le, c in items:  # cumulative counts never fall; summed deltas might by float noise
        running = max(running, c)
        fixed.append((le, running))
    total = fixed[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, c in fixed:
        if c >= rank:
            if math.isinf(le):
                return lower
            if c == below:
                return le
            return lower + (le - lower) * (rank - below) / (c - below)
        lower, below = le, c
    return lower


def _add_buckets(into: dict[str, float], add: Mapping[str, float]) -> None:
    for le, v in add.items():
        into[le] = into.get(le, 0.0) + v


def _chunks(ids: list[str], n: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


def store(session: Session, reading: Reading, now: datetime, *, load_complete: bool = True) -> dict[str, int]:
    """Turn one reading into per-minute deltas and move the cursors, in the caller's transaction. Deployments
    not in the reading leave the queue table: at once when every endpoint answered (`load_complete`), else once
    their last value is older than LOAD_STALE (the endpoint that did not answer may have been theirs)."""
    minute = now.replace(second=0, microsecond=0)
    ids = [*reading.counters, *reading.histograms, MARKER]
    cursors: dict[str, MetricCursor] = {}
    for chunk in _chunks(ids):
        cursors.update(
            {c.id: c for c in session.scalars(select(MetricCursor).where(MetricCursor.id.in_(chunk)))}
        )
    baseline = MARKER not in cursors
    rows: dict[Key, RequestMinute] = {}

    def row(key: Key) -> RequestMinute:
        r = rows.get(key)
        if r is None:
            r = session.get(RequestMinute, (minute, *key))
            if r is None:
                r = RequestMinute(
                    minute=minute,
                    application=key[0],
                    route=key[1],
                    status_code=key[2],
                    requests=0,
                    latency_count=0,
                    latency_sum_ms=0.0,
                    latency_buckets={},
                )
                session.add(r)
            rows[key] = r
        return r

    def move(sid: str, target: str, value: dict[str, Any]) -> None:
        c = cursors.get(sid)
        if c is None:
            session.add(MetricCursor(id=sid, target=target[:255], value=value, seen_at=now))
        elif c.value != value or now - c.seen_at > timedelta(hours=1):  # live series are never pruned
            c.value, c.seen_at = value, now

    counted = 0
    for sid, (target, key, value) in reading.counters.items():
        prev = cursors.get(sid)
        d = round(counter_delta(None if prev is None else float(prev.value.get("v", 0)), value, baseline))
        if d > 0:
            row(key).requests += d
            counted += d
        move(sid, target, {"v": value})
    for sid, (target, key, h) in reading.histograms.items():
        prev = cursors.get(sid)
        dh = hist_delta(None if prev is None else Hist.from_json(prev.value), h, baseline)
        if dh is not None and dh.count > 0:
            r = row(key)
            r.latency_count += round(dh.count)
            r.latency_sum_ms += dh.sum
            buckets = dict(r.latency_buckets or {})
            _add_buckets(buckets, dh.buckets)
            r.latency_buckets = buckets  # a new dict: the JSON column sees the change
        move(sid, target, h.as_json())
    move(MARKER, "", {})
    for (app, dep), (queued, ongoing) in reading.load.items():
        lr = session.get(DeploymentLoad, (app, dep))
        if lr is None:
            session.add(
                DeploymentLoad(application=app, deployment=dep, queued=queued, ongoing=ongoing, at=now)
            )
        else:
            lr.queued, lr.ongoing, lr.at = queued, ongoing, now
    for lr in session.scalars(select(DeploymentLoad)):
        if (lr.application, lr.deployment) not in reading.load and (
            load_complete or now - lr.at > LOAD_STALE
        ):
            session.delete(lr)
    return {
        "requests": counted,
        "series": len(reading.counters) + len(reading.histograms),
        "baseline": int(baseline),
    }


def prune(session: Session, now: datetime, retention_h: int) -> None:
    cutoff = now - timedelta(hours=retention_h)
    session.execute(delete(RequestMinute).where(RequestMinute.minute < cutoff))
    session.execute(delete(MetricCursor).where(MetricCursor.seen_at < cutoff, MetricCursor.id != MARKER))


def discover(state: AppState, http: httpx.Client) -> list[str]:
    """Every node's metrics endpoint (and the head's autoscaler and dashboard), as Ray lists them for Prometheus."""
    s = state.settings
    token = s.ray_auth_token()
    r = http.get(
        (s.ray_dashboard_url or "").rstrip("/") + "/api/prometheus/sd",
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    r.raise_for_status()
    return sorted({str(t) for group in r.json() for t in group.get("targets", [])})


def scrape(http: httpx.Client, target: str) -> str:
    # Ray's metrics port needs no token: the cluster token is not sent to donors' endpoints
    with http.stream("GET", f"http://{target}/metrics") as r:
        r.raise_for_status()
        chunks, size = [], 0
        for chunk in r.iter_bytes():
            size += len(chunk)
            if size > MAX_SCRAPE_BYTES:
                raise ValueError(f"{target} sent over {MAX_SCRAPE_BYTES} bytes of metrics")
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


@dataclass
class CollectorView:
    at: datetime | None = None
    error: str | None = None  # nothing could be read: Ray's target list or every endpoint failed
    targets: int = 0
    unreachable: list[str] = field(default_factory=list)  # "host:port: why" of endpoints that did not answer
    passes: int = 0


class Collector:
    """Scrapes Serve's metrics every `interval_s` on a thread of its own (a slow node never delays the
    reconciler); started beside the reconciler when a Ray head is wired."""

    def __init__(self, state: AppState, interval_s: float | None = None) -> None:
        self.state = state
        self.interval_s = interval_s or state.settings.metrics_interval_s
        self.view = CollectorView()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rma-metrics", daemon=True)
        self._pruned_at: datetime | None = None
        self.summaries: dict[
            int, tuple[Any, schemas.RequestMetricsOut]
        ] = {}  # step_s -> (pass, minute), figures
        self.ledger: dict[int, tuple[Any, schemas.ContributionsOut]] = {}  # hours -> (pass, minute), figures

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> Collector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.collect_once()
            except Exception as exc:
                log.exception("metrics pass failed")
                self.view.error = f"metrics pass failed: {type(exc).__name__}: {exc}"
            self._stop.wait(self.interval_s)

    def collect_once(self, now: datetime | None = None) -> dict[str, int]:
        with httpx.Client(timeout=5) as http:
            try:
                targets = discover(self.state, http)
            except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
                self.view.error = f"cannot list Ray's metrics endpoints: {exc}"
                return {}
            reading, failed = Reading(), []
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
                texts = dict(zip(targets, pool.map(lambda t: _try_scrape(http, t), targets), strict=True))
            try:  # which node each endpoint is, for the contribution ledger; without it, no ledger this pass
                node_of: dict[str, str] | None = contributions.discover_nodes(self.state, http)
            except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
                log.warning("contribution ledger skipped a pass: cannot read Ray's node table: %s", exc)
                node_of = None
            if node_of is not None:
                texts.update(self._edge_nodes(http, node_of))
        nodes: dict[str, contributions.NodeReading] = {}
        core = set(targets)
        for target, text in texts.items():
            if target not in core:  # an edge node's endpoint: the ledger's only
                if isinstance(text, str):
                    try:
                        nodes[target] = contributions.parse(text, target)
                    except (ValueError, KeyError) as exc:
                        log.warning("contribution ledger: cannot parse %s's metrics: %r", target, exc)
                continue
            if isinstance(text, Exception):
                failed.append(f"{target}: {text}")
                continue
            try:
                reading.merge(parse(text, target))
                if node_of and target in node_of:
                    nodes[target] = contributions.parse(text, target)
            except (ValueError, KeyError) as exc:  # not Prometheus text, or a bucket without its bound
                failed.append(f"{target}: cannot parse its metrics: {exc!r}"[:200])
        now = now or utcnow()
        with self.state.sessions() as session, session.begin():
            # a node that did not answer keeps its deployments' last values rather than dropping them
            out = store(session, reading, now, load_complete=not failed)
            if node_of is not None:  # the ledger's rows and cursors commit with the request metrics' cursors
                contributions.store(session, nodes, node_of, now)
            if self._pruned_at is None or now - self._pruned_at > timedelta(minutes=10):
                prune(session, now, self.state.settings.metrics_retention_h)
                contributions.maintain(session, now, self.state.settings)
                self._pruned_at = now
        # Ray lists its autoscaler's and dashboard's endpoints too; one of them down is a note, not an outage
        self.view.at, self.view.targets, self.view.passes = now, len(targets), self.view.passes + 1
        self.view.unreachable = [f[:200] for f in failed]
        self.view.error = (
            "Ray lists no metrics endpoint yet"
            if not targets
            else f"no Ray metrics endpoint answered ({len(failed)} tried)"
            if len(failed) == len(targets)
            else None
        )
        return out

    def _edge_nodes(self, http: httpx.Client, node_of: dict[str, str]) -> dict[str, str | Exception]:
        """Each edge cluster's node endpoints, scraped for the contribution ledger; `node_of` gains their
        nodes. An edge that does not answer is skipped this pass."""
        out: dict[str, str | Exception] = {}
        for edge in self.state.settings.edges:
            try:
                of = contributions.discover_nodes(self.state, http, edge.name)
            except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
                log.warning("contribution ledger: cannot read edge %s's node table: %s", edge.name, exc)
                continue
            new = [t for t in of if t not in node_of]
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(new)))) as pool:
                out.update(zip(new, pool.map(lambda t: _try_scrape(http, t), new), strict=True))
            node_of.update({t: of[t] for t in new})
        return out


def _try_scrape(http: httpx.Client, target: str) -> str | Exception:
    try:
        return scrape(http, target)
    except (httpx.HTTPError, ValueError) as exc:
        return exc


@dataclass
class _Acc:
    requests: int = 0
    e4: int = 0
    e5: int = 0
    # bucket counts grouped by their bounds (every row of one Ray version has the same), summed as lists
    hists: dict[tuple[str, ...], list[float]] = field(default_factory=dict)

    def add(self, status_code: str, requests: int, buckets: Mapping[str, float] | None) -> None:
        self.requests += requests
        if status_code.startswith("4"):
            self.e4 += requests
        elif status_code.startswith("5"):
            self.e5 += requests
        if buckets:
            bounds, counts = tuple(buckets), list(buckets.values())
            acc = self.hists.get(bounds)
            if acc is None:
                self.hists[bounds] = counts
            else:
                acc[:] = map(operator.add, acc, counts)

    @property
    def buckets(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bounds, counts in self.hists.items():
            _add_buckets(out, dict(zip(bounds, counts, strict=True)))
        return out

    def figures(self) -> dict[str, Any]:
        b = self.buckets
        p50, p99 = (quantile(q, b) for q in QUANTILES)
        return {
            "requests": self.requests,
            "errors_4xx": self.e4,
            "errors_5xx": self.e5,
            "p50_ms": _round(p50),
            "p99_ms": _round(p99),
        }


def cached_summary(
    session: Session, collector: Collector | None, step_s: int = 600
) -> schemas.RequestMetricsOut:
    """summary(), computed once per collector pass and minute (the rollups change only then): a busy day is
    tens of thousands of rows, and every open registry page asks every 15 s."""
    if collector is None:
        return summary(session, None, step_s=step_s)
    key = (collector.view.passes, utcnow().replace(second=0, microsecond=0))
    hit = collector.summaries.get(step_s)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = summary(session, collector, step_s=step_s)
    collector.summaries[step_s] = (key, out)
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def summary(
    session: Session,
    collector: Collector | None,
    now: datetime | None = None,
    step_s: int = 600,
) -> schemas.RequestMetricsOut:
    """The figures from the rollups: today (UTC day), the last hour, per application today, queues now and a
    24 h series in `step_s` buckets."""
    now = now or utcnow()
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    hour_ago = now - timedelta(hours=1)
    n = 86400 // step_s
    last = int(now.timestamp()) // step_s * step_s
    first = last - (n - 1) * step_s
    since = min(day_start, datetime.fromtimestamp(first, tz=now.tzinfo))
    today, hour = _Acc(), _Acc()
    apps: dict[str, _Acc] = defaultdict(_Acc)
    slots = [_Acc() for _ in range(n)]
    hour_start = hour_ago.replace(second=0, microsecond=0)
    m = RequestMinute
    # plain rows, not ORM objects: a busy day is tens of thousands of them
    for minute, app, status, requests, buckets in session.execute(
        select(m.minute, m.application, m.status_code, m.requests, m.latency_buckets).where(m.minute >= since)
    ):
        if minute.tzinfo is None:  # SQLite hands back naive datetimes outside the ORM's type
            minute = minute.replace(tzinfo=UTC)
        if minute >= day_start:
            today.add(status, requests, buckets)
            apps[app].add(status, requests, buckets)
        if minute >= hour_start:
            hour.add(status, requests, buckets)
        i = (int(minute.timestamp()) - first) // step_s
        if 0 <= i < n:
            slots[i].add(status, requests, buckets)
    slot_figures = [s.figures() for s in slots]
    series = schemas.RequestSeries(
        step_s=step_s,
        t=[first + i * step_s for i in range(n)],
        requests=[f["requests"] for f in slot_figures],
        errors=[f["errors_4xx"] + f["errors_5xx"] for f in slot_figures],
        p50_ms=[f["p50_ms"] for f in slot_figures],
        p99_ms=[f["p99_ms"] for f in slot_figures],
    )
    queues = [
        schemas.DeploymentQueue(
            application=lr.application,
            deployment=lr.deployment,
            queued=lr.queued,
            ongoing=lr.ongoing,
            at=lr.at,
        )
        for lr in session.scalars(
            select(DeploymentLoad).order_by(DeploymentLoad.application, DeploymentLoad.deployment)
        )
    ]
    if collector is None:
        col = schemas.CollectorOut(running=False, error="no Ray head is wired to this coordinator")
    else:
        v = collector.view
        col = schemas.CollectorOut(
            running=collector.running,
            interval_s=collector.interval_s,
            at=v.at,
            error=v.error,
            targets=v.targets,
            unreachable=list(v.unreachable),
        )
    return schemas.RequestMetricsOut(
        generated_at=now,
        day_start=day_start,
        today=schemas.RequestFigures(**today.figures()),
        last_hour=schemas.RequestFigures(**hour.figures()),
        applications=[
            schemas.ApplicationRequests(application=a, **acc.figures())
            for a, acc in sorted(apps.items(), key=lambda kv: -kv[1].requests)
        ],
        queued_total=sum(q.queued for q in queues),
        queues=queues,
        series=series,
        collector=col,
    )
