"""Ray Serve request metrics for the registry: requests today, errors, p50/p99, queues per deployment, 24 h series,
per cluster (the core and each edge, rma_ray.edges) and for the whole pool.

A collector thread on the head scrapes every Ray node's metrics endpoint of every cluster (the targets each
cluster's Ray publishes for Prometheus at its dashboard's `/api/prometheus/sd`, and the nodes of its node table),
parses the Prometheus text with prometheus_client's parser and keeps per-minute rollups in the coordinator's
database, keyed by the cluster whose Serve ingress recorded them (a client's request that the core's gateway
forwards to an edge is counted once by the core's ingress, for the gateway, and once by the edge's, for the app
that served it: each cluster's figures are what that cluster served):

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
the rollups, so a restarted coordinator neither loses nor double-counts. The very first pass that reads a cluster
(no marker of it: a new database, an edge added since, or one away past the retention) takes a baseline for
that cluster: its history before the collector saw it is not today's traffic; the marker is written once every
endpoint of the cluster answered in one pass. A cluster that does not answer is skipped: its cursors stay as
they were, and its next answer counts everything since.

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
from rma_ray.edges import CORE

log = logging.getLogger("rma.metrics")

REQUESTS = "ray_serve_num_http_requests"  # the family's name as parsed (the `_total` suffix is the sample's)
LATENCY = "ray_serve_http_request_latency_ms"
QUEUED = "ray_serve_deployment_queued_queries"
ONGOING = "ray_serve_num_ongoing_requests_at_replicas"
FAMILIES = (REQUESTS, LATENCY, QUEUED, ONGOING)
# labels that say nothing about which series it is (OpenTelemetry's scope) or split one histogram into buckets
_NOT_IDENTITY = {"le", "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
MARKER = "collector-started"  # the core's; an edge's is marker(name)
MAX_SCRAPE_BYTES = 64 * 1024 * 1024
# An edge's endpoints are its untrusted donors' to write: a count outside 0..MAX_COUNT (the rollups' int4
# columns) is dropped, a gauge clamped into it, and a target serving over MAX_SERIES of our samples is not read
MAX_COUNT = 2**31 - 1
MAX_SUM_MS = 2.0**62
MAX_SERIES = 2000
TIMEOUT = httpx.Timeout(5, connect=2)
QUANTILES = (0.5, 0.99)
LOAD_STALE = timedelta(minutes=5)

Key = tuple[str, str, str, str]  # cluster, application, route, status code


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
    # (cluster, app, deployment) -> [queued, ongoing]
    load: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def merge(self, other: Reading) -> None:
        self.counters.update(other.counters)
        self.histograms.update(other.histograms)
        for k, (q, o) in other.load.items():
            mine = self.load.setdefault(k, [0.0, 0.0])
            mine[0] += q
            mine[1] += o


def marker(cluster: str = CORE) -> str:
    """The cursor whose presence says the cluster has been read before (absent: the next pass is a baseline)."""
    return MARKER if cluster == CORE else f"{MARKER}:{cluster}"


def _series_id(target: str, family: str, labels: Mapping[str, str], cluster: str = CORE) -> str:
    ident = "|".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _NOT_IDENTITY)
    # the core's ids are those of before edges existed (its cursors carry over); an edge's name its cluster, so
    # that two clusters' endpoints never share a cursor, whatever their addresses
    where = target if cluster == CORE else f"{cluster}|{target}"
    return hashlib.sha256(f"{where}|{family}|{ident}".encode()).hexdigest()


def _key(labels: Mapping[str, str], cluster: str) -> Key:
    return (
        cluster,
        labels.get("application", "")[:128],
        labels.get("route", "")[:255],
        labels.get("status_code", "")[:8],
    )


def _wanted(text: str) -> str:
    """Only the lines of the families we read: a head's endpoint serves ~0.5 MB, mostly Ray's own metrics."""
    heads = tuple(p for f in FAMILIES for p in (f, f"# HELP {f}", f"# TYPE {f}"))
    return "\n".join(line for line in text.splitlines() if line.startswith(heads)) + "\n"


def _count(v: float) -> bool:
    return math.isfinite(v) and 0 <= v <= MAX_COUNT


def _bound(le: str) -> bool:
    try:
        return not math.isnan(float(le))
    except ValueError:
        return False


def parse(text: str, target: str, cluster: str = CORE) -> Reading:
    """The Serve request families in one target's Prometheus text (prometheus_client's parser), for `cluster`.
    Values no Serve process writes (not finite, negative, past MAX_COUNT) are dropped, a histogram with one of
    them whole; ValueError when the target serves over MAX_SERIES samples of these families."""
    out = Reading()
    hists: dict[str, tuple[Key, Hist]] = {}
    bad: set[str] = set()
    families = list(text_string_to_metric_families(_wanted(text)))
    if sum(len(f.samples) for f in families) > MAX_SERIES:
        raise ValueError(f"over {MAX_SERIES} Serve request series")
    for fam in families:
        if fam.name == REQUESTS:
            for s in fam.samples:
                if (
                    s.name.endswith("_total")
                    and not s.labels.get("route", "").startswith("/-/")
                    and _count(s.value)
                ):
                    sid = _series_id(target, fam.name, s.labels, cluster)
                    out.counters[sid] = (target, _key(s.labels, cluster), s.value)
        elif fam.name == LATENCY:
            for s in fam.samples:
                if s.labels.get("route", "").startswith("/-/"):
                    continue
                sid = _series_id(target, fam.name, s.labels, cluster)
                h = hists.setdefault(sid, (_key(s.labels, cluster), Hist({}, 0.0, 0.0)))[1]
                if s.name.endswith("_sum"):
                    ok = math.isfinite(s.value) and 0 <= s.value <= MAX_SUM_MS
                    h.sum = s.value
                else:
                    ok = _count(s.value)
                    if s.name.endswith("_bucket"):
                        ok = ok and _bound(s.labels["le"])
                        h.buckets[s.labels["le"]] = s.value
                    elif s.name.endswith("_count"):
                        h.count = s.value
                if not ok:
                    bad.add(sid)
        elif fam.name in (QUEUED, ONGOING):
            col = 0 if fam.name == QUEUED else 1
            for s in fam.samples:
                k = (cluster, s.labels.get("application", "")[:128], s.labels.get("deployment", "")[:128])
                if math.isfinite(s.value):
                    out.load.setdefault(k, [0.0, 0.0])[col] += min(max(0.0, s.value), MAX_COUNT)
    out.histograms = {sid: (target, key, h) for sid, (key, h) in hists.items() if sid not in bad}
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


def store(
    session: Session,
    reading: Reading,
    now: datetime,
    *,
    answered: Iterable[str] | None = None,
    complete: Iterable[str] | None = None,
) -> dict[str, int]:
    """Turn one reading into per-minute deltas and move the cursors, in the caller's transaction.

    `answered`: the clusters this pass read (at least one endpoint answered): each takes its baseline on its
    first pass and has its marker moved; a cluster not among them (it did not answer) keeps its cursors as they
    were. Default: the core and every cluster in the reading. `complete`: the answered clusters every endpoint of
    which answered (default: all answered): their deployments not in the reading leave the queue table at once;
    other deployments go once their last value is older than LOAD_STALE (the endpoint, or the cluster, that did
    not answer may have been theirs)."""
    minute = now.replace(second=0, microsecond=0)
    read = {k[0] for _, k, _ in reading.counters.values()} | {k[0] for _, k, _ in reading.histograms.values()}
    read |= {k[0] for k in reading.load}
    answered = {CORE, *read} if answered is None else set(answered)
    complete = answered if complete is None else set(complete) & answered
    markers = {c: marker(c) for c in answered}
    ids = [*reading.counters, *reading.histograms, *markers.values()]
    cursors: dict[str, MetricCursor] = {}
    for chunk in _chunks(ids):
        cursors.update(
            {c.id: c for c in session.scalars(select(MetricCursor).where(MetricCursor.id.in_(chunk)))}
        )
    baseline = {c for c, m in markers.items() if m not in cursors}
    rows: dict[Key, RequestMinute] = {}

    def row(key: Key) -> RequestMinute:
        r = rows.get(key)
        if r is None:
            r = session.get(RequestMinute, (minute, *key))
            if r is None:
                r = RequestMinute(
                    minute=minute,
                    cluster=key[0],
                    application=key[1],
                    route=key[2],
                    status_code=key[3],
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
        if key[0] not in answered:
            continue
        prev = cursors.get(sid)
        prev_v = None if prev is None else float(prev.value.get("v", 0))
        d = round(counter_delta(prev_v, value, key[0] in baseline))
        if d > 0:
            r = row(key)
            r.requests = min(MAX_COUNT, r.requests + d)
            counted += d
        move(sid, target, {"v": value})
    for sid, (target, key, h) in reading.histograms.items():
        if key[0] not in answered:
            continue
        prev = cursors.get(sid)
        dh = hist_delta(None if prev is None else Hist.from_json(prev.value), h, key[0] in baseline)
        if dh is not None and dh.count > 0:
            r = row(key)
            r.latency_count = min(MAX_COUNT, r.latency_count + round(dh.count))
            r.latency_sum_ms += dh.sum
            buckets = dict(r.latency_buckets or {})
            _add_buckets(buckets, dh.buckets)
            r.latency_buckets = buckets  # a new dict: the JSON column sees the change
        move(sid, target, h.as_json())
    for c, m in markers.items():  # a first read is done once every endpoint of the cluster answered
        if c in complete or m in cursors:
            move(m, "", {})
    for (cluster, app, dep), summed in reading.load.items():
        if cluster not in answered:
            continue
        queued, ongoing = (min(v, MAX_COUNT) for v in summed)  # summed over targets: finite, maybe past it
        lr = session.get(DeploymentLoad, (cluster, app, dep))
        if lr is None:
            session.add(
                DeploymentLoad(
                    cluster=cluster, application=app, deployment=dep, queued=queued, ongoing=ongoing, at=now
                )
            )
        else:
            lr.queued, lr.ongoing, lr.at = queued, ongoing, now
    for lr in session.scalars(select(DeploymentLoad)):
        if (lr.cluster, lr.application, lr.deployment) not in reading.load and (
            lr.cluster in complete or now - lr.at > LOAD_STALE
        ):
            session.delete(lr)
    return {
        "requests": counted,
        "series": len(reading.counters) + len(reading.histograms),
        "baseline": int(CORE in baseline),
        "baselines": len(baseline),
    }


def prune(session: Session, now: datetime, retention_h: int) -> None:
    cutoff = now - timedelta(hours=retention_h)
    session.execute(delete(RequestMinute).where(RequestMinute.minute < cutoff))
    # the markers too: a cluster away past the retention has lost its series' cursors with it, so its next
    # pass is a first read (a baseline), not its whole history counted as new
    session.execute(delete(MetricCursor).where(MetricCursor.seen_at < cutoff))


def discover(state: AppState, http: httpx.Client, cluster: str = CORE) -> list[str]:
    """Every node's metrics endpoint of a cluster (and its head's autoscaler and dashboard), as that cluster's Ray
    lists them for Prometheus."""
    s = state.settings
    token = s.cluster_token(cluster)
    r = http.get(
        (s.cluster_dashboard(cluster) or "").rstrip("/") + "/api/prometheus/sd",
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
    # "host:port: why" of the core's endpoints that did not answer, "edge: host:port: why" of an edge's
    unreachable: list[str] = field(default_factory=list)
    # "cluster: why" of a cluster whose endpoints could not be listed (not among `targets`)
    unlisted: list[str] = field(default_factory=list)
    clusters: list[str] = field(default_factory=list)  # the clusters read by the last pass
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
        # (step_s, cluster) -> (pass, minute), figures
        self.summaries: dict[tuple[int, str | None], tuple[Any, schemas.RequestMetricsOut]] = {}
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
        """One pass over every cluster: the core's and each edge's endpoints, scraped together; the request
        metrics and the contribution ledger written in one transaction. A cluster whose endpoints cannot be
        listed is skipped (its cursors kept); nothing is written when no cluster could be listed."""
        listed: dict[str, list[str]] = {}  # cluster -> its endpoints
        unlisted: dict[str, str] = {}  # cluster -> why its endpoints could not be listed
        # endpoint -> Ray node id, for the ledger; None: no ledger this pass
        node_of: dict[str, str] | None = {}
        clusters = self.state.settings.clusters
        with httpx.Client(timeout=TIMEOUT) as http:
            # the clusters listed side by side: an edge's dashboard that never answers costs one timeout a pass
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(clusters)))) as pool:
                lists = list(pool.map(lambda c: _list_cluster(self.state, http, c), clusters))
            for cluster, (targets, of, why) in zip(clusters, lists, strict=True):
                if of is None:  # which node each endpoint is; without the core's, no ledger this pass
                    if cluster == CORE:
                        node_of = None
                    of = {}
                if targets is None and not of:
                    unlisted[cluster] = why
                    continue
                if node_of is not None:  # Ray's node table lists the nodes' endpoints too
                    node_of.update(of)
                listed[cluster] = sorted({*(targets or ()), *of})
            if not listed:
                why = unlisted.get(CORE) or next(iter(unlisted.values()), "no cluster is wired")
                self.view.error = (
                    why if len(unlisted) <= 1 else "; ".join(f"{c}: {w}" for c, w in unlisted.items())
                )
                self.view.unlisted = [f"{c}: {w}"[:200] for c, w in unlisted.items()]
                return {}
            todo = [(c, t) for c, ts in listed.items() for t in ts]
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
                texts = list(pool.map(lambda ct: _try_scrape(http, ct[1]), todo))
        reading, failed = Reading(), []
        nodes: dict[str, contributions.NodeReading] = {}
        answered: set[str] = set()
        incomplete: set[str] = set()
        for (cluster, target), text in zip(todo, texts, strict=True):
            where = target if cluster == CORE else f"{cluster}: {target}"
            if isinstance(text, Exception):
                failed.append(f"{where}: {text}")
                incomplete.add(cluster)
                continue
            if node_of and target in node_of:
                try:  # the ledger's own reading: a node over its cap is left out of the ledger only
                    nodes[target] = contributions.parse(text, target)
                except ValueError as exc:
                    log.warning("contributions of %s not read this pass: %r", where, exc)
            try:
                reading.merge(parse(text, target, cluster))
            except (ValueError, KeyError) as exc:  # not Prometheus text, a bucket without its bound, too many
                log.warning("metrics of %s not read this pass: %r", where, exc)
                failed.append(f"{where}: cannot parse its metrics: {exc!r}"[:200])
                incomplete.add(cluster)
                continue
            answered.add(cluster)
        now = now or utcnow()
        with self.state.sessions() as session, session.begin():
            # a node (or a cluster) that did not answer keeps its deployments' last values rather than dropping
            # them, and its cursors: its next answer counts what it served meanwhile
            out = store(session, reading, now, answered=answered, complete=answered - incomplete)
            if node_of is not None:  # the ledger's rows and cursors commit with the request metrics' cursors
                contributions.store(session, nodes, node_of, now)
            if self._pruned_at is None or now - self._pruned_at > timedelta(minutes=10):
                prune(session, now, self.state.settings.metrics_retention_h)
                contributions.maintain(session, now, self.state.settings)
                self._pruned_at = now
        # Ray lists its autoscaler's and dashboard's endpoints too; one of them down is a note, not an outage
        self.view.at, self.view.targets, self.view.passes = now, len(todo), self.view.passes + 1
        self.view.unreachable = [f[:200] for f in failed]
        self.view.unlisted = [f"{c}: {w}"[:200] for c, w in unlisted.items()]
        self.view.clusters = sorted(answered, key=lambda c: (c != CORE, c))
        self.view.error = (
            f"{CORE}: {unlisted[CORE]}"
            if CORE in unlisted
            else "Ray lists no metrics endpoint yet"
            if not todo
            else f"no Ray metrics endpoint answered ({len(failed)} tried)"
            if len(failed) == len(todo)
            else None
        )
        return out


def _list_cluster(
    state: AppState, http: httpx.Client, cluster: str
) -> tuple[list[str] | None, dict[str, str] | None, str]:
    """A cluster's metrics endpoints (None: not listed), its node table's endpoint -> node id (None: not read)
    and why the endpoints could not be listed. A dashboard that did not answer is not asked twice."""
    try:
        targets: list[str] | None = discover(state, http, cluster)
        why = ""
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        why = f"cannot list Ray's metrics endpoints: {exc or type(exc).__name__}"
        if isinstance(exc, httpx.TransportError):
            return None, None, why
        targets = None
    try:
        return targets, contributions.discover_nodes(state, http, cluster), why
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        log.warning("contribution ledger: cannot read %s's node table: %s", cluster, exc)
        return targets, None, why


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
    session: Session, collector: Collector | None, step_s: int = 600, cluster: str | None = None
) -> schemas.RequestMetricsOut:
    """summary(), computed once per collector pass and minute (the rollups change only then): a busy day is
    tens of thousands of rows, and every open registry page asks every 15 s."""
    if collector is None:
        return summary(session, None, step_s=step_s, cluster=cluster)
    key = (collector.view.passes, utcnow().replace(second=0, microsecond=0))
    hit = collector.summaries.get((step_s, cluster))
    if hit is not None and hit[0] == key:
        return hit[1]
    out = summary(session, collector, step_s=step_s, cluster=cluster)
    collector.summaries[(step_s, cluster)] = (key, out)
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def summary(
    session: Session,
    collector: Collector | None,
    now: datetime | None = None,
    step_s: int = 600,
    cluster: str | None = None,
) -> schemas.RequestMetricsOut:
    """The figures from the rollups: today (UTC day), the last hour, per cluster and application today, queues
    now and a 24 h series in `step_s` buckets; of one cluster's Serve ingress, or (None) of the pool: today, the
    last hour and the series are then the clients' requests, as the core's ingress recorded them (every client's
    request enters there; one the core's gateway forwards to an edge is counted again by the edge's ingress, so
    adding the edges' would count it twice), the applications and queues those of every cluster."""
    totals = cluster or CORE
    now = now or utcnow()
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    hour_ago = now - timedelta(hours=1)
    n = 86400 // step_s
    last = int(now.timestamp()) // step_s * step_s
    first = last - (n - 1) * step_s
    since = min(day_start, datetime.fromtimestamp(first, tz=now.tzinfo))
    today, hour = _Acc(), _Acc()
    apps: dict[tuple[str, str], _Acc] = defaultdict(_Acc)  # (cluster, application)
    slots = [_Acc() for _ in range(n)]
    hour_start = hour_ago.replace(second=0, microsecond=0)
    m = RequestMinute
    # plain rows, not ORM objects: a busy day is tens of thousands of them
    rows = select(m.minute, m.cluster, m.application, m.status_code, m.requests, m.latency_buckets).where(
        m.minute >= since
    )
    if cluster is not None:
        rows = rows.where(m.cluster == cluster)
    for minute, where, app, status, requests, buckets in session.execute(rows):
        if minute.tzinfo is None:  # SQLite hands back naive datetimes outside the ORM's type
            minute = minute.replace(tzinfo=UTC)
        if minute >= day_start:
            apps[(where, app)].add(status, requests, buckets)
        if where != totals:  # an edge's share of the clients' requests, already counted by the core's ingress
            continue
        if minute >= day_start:
            today.add(status, requests, buckets)
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
    load = select(DeploymentLoad).order_by(
        DeploymentLoad.cluster != CORE,
        DeploymentLoad.cluster,
        DeploymentLoad.application,
        DeploymentLoad.deployment,
    )
    if cluster is not None:
        load = load.where(DeploymentLoad.cluster == cluster)
    queues = [
        schemas.DeploymentQueue(
            cluster=lr.cluster,
            application=lr.application,
            deployment=lr.deployment,
            queued=lr.queued,
            ongoing=lr.ongoing,
            at=lr.at,
        )
        for lr in session.scalars(load)
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
            unlisted=list(v.unlisted),
            clusters=list(v.clusters),
        )
    return schemas.RequestMetricsOut(
        generated_at=now,
        cluster=cluster,
        day_start=day_start,
        today=schemas.RequestFigures(**today.figures()),
        last_hour=schemas.RequestFigures(**hour.figures()),
        applications=[
            schemas.ApplicationRequests(cluster=c, application=a, **acc.figures())
            for (c, a), acc in sorted(apps.items(), key=lambda kv: (-kv[1].requests, kv[0][0] != CORE, kv[0]))
        ],
        queued_total=sum(q.queued for q in queues),
        queues=queues,
        series=series,
        collector=col,
    )
