"""The contribution ledger: what each donor's node gave the pool, per minute, from the metrics the registry's
collector already scrapes (admission.services.metrics) — nothing a donor's agent counts for itself.

Per donor and minute (rolled into one row per hour after `contribution_minutes_h`, pruned after
`contribution_retention_d`):

- **CPU-seconds**: `ray_component_cpu_percentage`, the reporter agent's gauge of each Ray process on the node
  (raylet, agent, workers and the replicas in them; psutil's CPU percent since its previous reading, 100 = one
  core), summed over the node's processes and integrated over the time since the collector's previous pass
  for that node. Ray 2.60 has no per-process CPU counter on the node's endpoint (`process_cpu_seconds_total`
  there is only the exporter's own process), so this is a rectangle sum of a gauge: exact when the scrape
  period equals Ray's report period; otherwise each pass is off by at most (the highest minus the lowest
  CPU use within the period) x the period, and the errors do not add up in one direction. The gauges are
  exported only while the reporter refreshes them (Ray's OpenTelemetry recorder drops a gauge after its TTL,
  and on a loaded node the reporter lags): a pass that finds none integrates nothing and keeps the node's
  last time, so the next reading covers the gap. A gap longer than MAX_GAP (a stopped coordinator, an
  unreachable node) counts MAX_GAP, never more: the ledger under-counts rather than invents work.
- **GPU-seconds**: `ray_node_gpus_utilization` (percent per GPU, from the same agent), integrated the same
  way; a node without GPUs exports none, and its column is 0.
- **requests**: `ray_serve_deployment_request_counter`, counted by each replica (so: by the node the replica
  runs on), as deltas of the cumulative counter with the collector's restart rules.
- **LLM tokens**: vLLM's `vllm:generation_tokens` counter as Ray exports it from the replica's node (vLLM's
  RayPrometheusStatLogger sanitises the name for OpenTelemetry: `ray_vllm_generation_tokens_total`; the
  colon forms are read too), as deltas like the requests. Our LLM deployment runs with
  `log_engine_metrics=False` (deployments/llm/config.py), so today no token counter reaches Ray's exporter
  and the column stays 0 until that is turned on.

A scrape target (`host:port`, as Ray publishes it for Prometheus) is mapped to a Ray node id with the
dashboard's node table (each node's `nodeManagerAddress` and `metricsExportPort`, the very fields Ray builds
its target list from), and a Ray node id to a donor with the registry's `workers.ray_node_id`, which the
reconciler sets after checking the node's labels and address, and which a donor's heartbeat may also claim: a
node two donors claim goes to the one the reconciler saw alive on it, or to no one (`owners`). So a node says
nothing about whose it is; a node no donor accounts for (the head, an intruder) is attributed to no one and
leaves no cursor behind.
Edge clusters (untrusted donors) are read the same way through each edge's dashboard: their nodes' endpoints
are scraped once a pass, for the ledger and for the edge's own Serve request metrics (admission.services.metrics,
per cluster); an edge whose dashboard or node does not answer is skipped for that pass, which loses no counted
work (counters are cumulative) and at most MAX_GAP of CPU time per pass.

Everything here is what Ray's processes on the donor's machine export: a donor who controls that machine can
make them export more. The ledger avoids trusting the donor's agent, not the donor's hardware; sampled
re-checks on trusted replicas are the remedy for that, and are not this module's.

Cursors (the counters' last values, each node's last pass time and a started-marker) live in the collector's
`metric_cursors` table and are written in the collector's transaction, with the rows: a restarted coordinator
neither loses nor double-counts. The first pass against a ledger with no marker takes a baseline.

Credits = sum(weight x amount) with the weights of the coordinator's settings (`credit_per_*`).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from admission import schemas
from admission.models import ContributionMinute, MetricCursor, Worker, utcnow
from admission.state import AppState
from rma_ray.edges import CORE
from rma_ray.settings import Settings

CPU = "ray_component_cpu_percentage"
GPU = "ray_node_gpus_utilization"
REQUESTS = "ray_serve_deployment_request_counter"  # the family's name as parsed; its sample ends in _total
TOKENS = ("ray_vllm_generation_tokens", "ray_vllm:generation_tokens", "vllm:generation_tokens")
FAMILIES = (CPU, GPU, REQUESTS, *TOKENS)
_NOT_IDENTITY = {"otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
MARKER = "contributions-started"
MAX_GAP = timedelta(minutes=2)
# what a node's endpoint serves is its donor's to write: a counter outside 0..MAX_VALUE is dropped, a gauge
# clamped into it (an infinite or huge value would fail the collector's whole transaction)
MAX_VALUE = 2**31 - 1
MAX_SERIES = 2000  # samples of our families per node and pass, as the request metrics' (metrics.MAX_SERIES)
ROLLUP_WINDOW = timedelta(days=3)  # rows older than the per-minute span looked at on each rollup
SERIES_HOURS = 168


@dataclass
class NodeReading:
    """One node's endpoint in one scrape: gauges now, counters' cumulative values by series id."""

    cpu_pct: float | None = None  # summed over Ray's processes: 100 = one core busy; None: not exported
    gpu_pct: float = 0.0  # summed over the node's GPUs: 100 = one GPU busy
    requests: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)


@dataclass
class Amounts:
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    requests: int = 0
    tokens: int = 0

    def add(self, cpu_s: float, gpu_s: float, requests: int, tokens: int) -> None:
        self.cpu_s += cpu_s or 0.0
        self.gpu_s += gpu_s or 0.0
        self.requests += int(requests or 0)
        self.tokens += int(tokens or 0)

    def figures(self, w: schemas.CreditWeights) -> schemas.ContributionFigures:
        return schemas.ContributionFigures(
            cpu_s=round(self.cpu_s, 3),
            gpu_s=round(self.gpu_s, 3),
            requests=self.requests,
            tokens=self.tokens,
            credits=credits(self, w),
        )


def weights(s: Settings) -> schemas.CreditWeights:
    return schemas.CreditWeights(
        per_cpu_hour=s.credit_per_cpu_hour,
        per_gpu_hour=s.credit_per_gpu_hour,
        per_1k_requests=s.credit_per_1k_requests,
        per_1k_tokens=s.credit_per_1k_tokens,
    )


def credits(a: Amounts, w: schemas.CreditWeights) -> float:
    return round(
        a.cpu_s / 3600 * w.per_cpu_hour
        + a.gpu_s / 3600 * w.per_gpu_hour
        + a.requests / 1000 * w.per_1k_requests
        + a.tokens / 1000 * w.per_1k_tokens,
        4,
    )


def _series_id(target: str, family: str, labels: Mapping[str, str]) -> str:
    ident = "|".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _NOT_IDENTITY)
    return hashlib.sha256(f"contrib|{target}|{family}|{ident}".encode()).hexdigest()


def _node_cursor_id(node_id: str) -> str:
    return hashlib.sha256(f"contrib-node|{node_id}".encode()).hexdigest()


def _wanted(text: str) -> str:
    """Only our families' lines: a node's endpoint serves hundreds of kB of Ray's own metrics."""
    heads = tuple(p for f in FAMILIES for p in (f, f"# HELP {f}", f"# TYPE {f}"))
    return "\n".join(line for line in text.splitlines() if line.startswith(heads)) + "\n"


def parse(text: str, target: str) -> NodeReading:
    """A node's reading; ValueError when it serves over MAX_SERIES samples of our families (each counter series
    becomes a cursor row: a donor's endpoint must not grow the coordinator's database at will)."""
    out = NodeReading()
    families = list(text_string_to_metric_families(_wanted(text)))
    if sum(len(f.samples) for f in families) > MAX_SERIES:
        raise ValueError(f"over {MAX_SERIES} contribution series")
    for fam in families:
        for s in fam.samples:
            if not math.isfinite(s.value):
                continue
            gauge, counter = min(max(0.0, s.value), MAX_VALUE), 0 <= s.value <= MAX_VALUE
            if fam.name == CPU:
                out.cpu_pct = (out.cpu_pct or 0.0) + gauge
            elif fam.name == GPU:
                out.gpu_pct += gauge
            elif fam.name == REQUESTS and s.name.endswith("_total") and counter:
                out.requests[_series_id(target, fam.name, s.labels)] = s.value
            elif fam.name in TOKENS and s.name.endswith("_total") and counter:
                out.tokens[_series_id(target, fam.name, s.labels)] = s.value
    return out


def node_targets(nodes_summary: Any) -> dict[str, str]:
    """`host:port` of each live node's metrics endpoint -> its Ray node id, from the dashboard's
    `/nodes?view=summary` (the fields Ray's own Prometheus target list is built from)."""
    out: dict[str, str] = {}
    rows = (((nodes_summary or {}).get("data") or {}).get("summary")) or []
    for row in rows:
        raylet = (row or {}).get("raylet") or {}
        addr, port, node_id = (
            raylet.get("nodeManagerAddress"),
            raylet.get("metricsExportPort"),
            raylet.get("nodeId"),
        )
        if addr and port and node_id and raylet.get("state", "ALIVE") == "ALIVE":
            host = f"[{addr}]" if ":" in str(addr) else str(addr)
            out[f"{host}:{int(port)}"] = str(node_id)
    return out


def discover_nodes(state: AppState, http: httpx.Client, cluster: str = CORE) -> dict[str, str]:
    s = state.settings
    token = s.cluster_token(cluster)
    r = http.get(
        (s.cluster_dashboard(cluster) or "").rstrip("/") + "/nodes",
        params={"view": "summary"},
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    r.raise_for_status()
    return node_targets(r.json())


def counter_delta(prev: float | None, cur: float, baseline: bool) -> float:
    """The rise since the cursor; a fall means the process restarted (its whole value is new); a series first
    seen after the baseline is new work (a restarted replica has a new WorkerId label)."""
    if prev is None:
        return 0.0 if baseline else cur
    return cur if cur < prev else cur - prev


def _chunks(ids: list[str], n: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


def owners(workers: Iterable[Worker]) -> dict[str, str]:
    """Ray node id -> the one donor it is credited to. `workers.ray_node_id` is written by the reconciler (after
    matching the node's `rma.io/node` label) and also by each heartbeat (the donor's own claim), so two donors
    can name one node. Then the claimant the reconciler last saw alive on a node wins when it is the only one;
    otherwise the node is credited to no one for this pass, and as its cursors do not move, its counted work
    (requests, tokens) goes to the right donor on the next pass that tells them apart: a claim can neither take
    another donor's work nor, for longer than it lasts, withhold it."""
    claims: dict[str, list[Worker]] = defaultdict(list)
    for w in workers:
        if w.ray_node_id and w.revoked_at is None and w.left_at is None:
            claims[w.ray_node_id].append(w)
    out: dict[str, str] = {}
    for node_id, ws in claims.items():
        seen = [w for w in ws if w.ray_alive] if len(ws) > 1 else ws
        if len(seen) == 1:
            out[node_id] = seen[0].id
    return out


def store(
    session: Session, readings: Mapping[str, NodeReading], node_of: Mapping[str, str], now: datetime
) -> dict[str, Amounts]:
    """One pass: `readings` by target, `node_of` target -> Ray node id. Adds each donor's share to its
    minute's row and moves the cursors, in the caller's transaction; returns what was added, by worker id."""
    minute = now.replace(second=0, microsecond=0)
    donors = owners(session.scalars(select(Worker).where(Worker.ray_node_id.in_(set(node_of.values())))))
    mine = {
        t: (node_of[t], donors[node_of[t]], r) for t, r in readings.items() if donors.get(node_of.get(t, ""))
    }
    ids = [MARKER]
    for _target, (node_id, _wid, r) in mine.items():
        ids += [_node_cursor_id(node_id), *r.requests, *r.tokens]
    cursors: dict[str, MetricCursor] = {}
    for chunk in _chunks(ids):
        cursors.update(
            {c.id: c for c in session.scalars(select(MetricCursor).where(MetricCursor.id.in_(chunk)))}
        )
    baseline = MARKER not in cursors

    def move(sid: str, target: str, value: dict[str, Any]) -> None:
        c = cursors.get(sid)
        if c is None:
            c = MetricCursor(id=sid, target=target[:255], value=value, seen_at=now)
            session.add(c)
            cursors[sid] = c
        elif c.value != value or now - c.seen_at > timedelta(hours=1):  # live series are never pruned
            c.value, c.seen_at = value, now

    added: dict[str, Amounts] = defaultdict(Amounts)
    for target, (node_id, wid, r) in mine.items():
        a = added[wid]
        nid = _node_cursor_id(node_id)
        prev = cursors.get(nid)
        if r.cpu_pct is not None:  # the reporter's gauges, absent between its reports once their TTL ran out
            if prev is not None:
                last = datetime.fromtimestamp(float(prev.value.get("t", 0)), tz=now.tzinfo)
                dt = min(max(0.0, (now - last).total_seconds()), MAX_GAP.total_seconds())
                a.cpu_s += r.cpu_pct / 100 * dt
                a.gpu_s += r.gpu_pct / 100 * dt
            move(nid, target, {"t": now.timestamp()})
        for counts, kind in ((r.requests, "requests"), (r.tokens, "tokens")):
            for sid, v in counts.items():
                c = cursors.get(sid)
                d = round(counter_delta(None if c is None else float(c.value.get("v", 0)), v, baseline))
                if kind == "requests":
                    a.requests += d
                else:
                    a.tokens += d
                move(sid, target, {"v": v})
    move(MARKER, "", {})
    for wid, a in added.items():
        if not (a.cpu_s or a.gpu_s or a.requests or a.tokens):
            continue
        row = session.get(ContributionMinute, (minute, wid))
        if row is None:
            row = ContributionMinute(minute=minute, worker_id=wid, cpu_s=0.0, gpu_s=0.0, requests=0, tokens=0)
            session.add(row)
        row.cpu_s += a.cpu_s
        row.gpu_s += a.gpu_s
        row.requests += a.requests
        row.tokens += a.tokens
    return dict(added)


def rollup(session: Session, now: datetime, minutes_h: int) -> int:
    """Rows older than `minutes_h` hours become one row per donor and hour (at the hour's first minute);
    returns the rows removed. Idempotent: an hour already rolled is one row and is left alone."""
    cutoff = (now - timedelta(hours=minutes_h)).replace(minute=0, second=0, microsecond=0)
    rows = session.scalars(
        select(ContributionMinute).where(
            ContributionMinute.minute < cutoff, ContributionMinute.minute >= cutoff - ROLLUP_WINDOW
        )
    ).all()
    groups: dict[tuple[datetime, str], list[ContributionMinute]] = defaultdict(list)
    for r in rows:
        groups[(r.minute.replace(minute=0, second=0, microsecond=0), r.worker_id)].append(r)
    removed = 0
    for (hour, wid), rs in groups.items():
        if len(rs) == 1 and rs[0].minute == hour:
            continue
        keep = next((r for r in rs if r.minute == hour), None)
        if keep is None:
            keep = ContributionMinute(minute=hour, worker_id=wid, cpu_s=0.0, gpu_s=0.0, requests=0, tokens=0)
            session.add(keep)
        for r in rs:
            if r is keep:
                continue
            keep.cpu_s += r.cpu_s
            keep.gpu_s += r.gpu_s
            keep.requests += r.requests
            keep.tokens += r.tokens
            session.delete(r)
            removed += 1
    return removed


def prune(session: Session, now: datetime, retention_d: int) -> None:
    session.execute(
        delete(ContributionMinute).where(ContributionMinute.minute < now - timedelta(days=retention_d))
    )


def maintain(session: Session, now: datetime, s: Settings) -> None:
    rollup(session, now, s.contribution_minutes_h)
    prune(session, now, s.contribution_retention_d)


def totals(
    session: Session,
    since: datetime | None,
    worker_id: str | None = None,
    worker_ids: Iterable[str] | None = None,
) -> dict[str, Amounts]:
    """Each donor's amounts since `since` (all time: None), of one donor or of some."""
    m = ContributionMinute
    q = select(m.worker_id, func.sum(m.cpu_s), func.sum(m.gpu_s), func.sum(m.requests), func.sum(m.tokens))
    if since is not None:
        q = q.where(m.minute >= since)
    if worker_id is not None:
        q = q.where(m.worker_id == worker_id)
    if worker_ids is not None:
        q = q.where(m.worker_id.in_(list(worker_ids)))
    out: dict[str, Amounts] = defaultdict(Amounts)
    for wid, cpu, gpu, req, tok in session.execute(q.group_by(m.worker_id)):
        out[wid].add(cpu, gpu, req, tok)
    return out


def _spans(now: datetime) -> tuple[datetime, datetime]:
    return now.replace(hour=0, minute=0, second=0, microsecond=0), now - timedelta(days=7)


def for_worker(
    state: AppState, session: Session, worker_id: str, now: datetime | None = None
) -> schemas.WorkerContribution:
    """One donor's contribution: today (UTC), the last 7 days, all time, with its credits."""
    now = now or utcnow()
    w = weights(state.settings)
    worker = session.get(Worker, worker_id)
    day_start, week = _spans(now)
    figs = {
        k: totals(session, since, worker_id).get(worker_id, Amounts()).figures(w)
        for k, since in (("today", day_start), ("last_7d", week), ("all_time", None))
    }
    return schemas.WorkerContribution(
        worker_id=worker_id,
        name=worker.name if worker is not None else "",
        generated_at=now,
        day_start=day_start,
        weights=w,
        **figs,
    )


def overview(
    state: AppState, session: Session, now: datetime | None = None, hours: int = SERIES_HOURS
) -> schemas.ContributionsOut:
    """Every donor that gave anything (or is registered), best first by credits all time, each with an hourly
    series of the last `hours` hours for its sparkline."""
    now = now or utcnow()
    w = weights(state.settings)
    day_start, week = _spans(now)
    today, last_7d, all_time = (totals(session, s) for s in (day_start, week, None))
    step = 3600
    last = int(now.timestamp()) // step * step
    first = last - (hours - 1) * step
    slots: dict[str, list[Amounts]] = {}
    m = ContributionMinute
    for wid, minute, cpu, gpu, req, tok in session.execute(
        select(m.worker_id, m.minute, m.cpu_s, m.gpu_s, m.requests, m.tokens).where(
            m.minute >= datetime.fromtimestamp(first, tz=now.tzinfo)
        )
    ):
        i = (int(minute.timestamp()) - first) // step
        if 0 <= i < hours:
            slots.setdefault(wid, [Amounts() for _ in range(hours)])[i].add(cpu, gpu, req, tok)
    # the columns only (a pool's every donor, left and revoked ones too: no ORM object each)
    columns = (Worker.id, Worker.name, Worker.tier, Worker.cluster, Worker.revoked_at, Worker.left_at)
    workers = {row.id: row for row in session.execute(select(*columns))}
    t = [first + i * step for i in range(hours)]

    def series_of(amounts: list[Amounts]) -> schemas.ContributionSeries:
        return schemas.ContributionSeries(
            step_s=step,
            t=t,
            cpu_s=[round(a.cpu_s, 3) for a in amounts],
            requests=[a.requests for a in amounts],
            tokens=[a.tokens for a in amounts],
            credits=[credits(a, w) for a in amounts],
        )

    # a donor that gave nothing lately (most, in a large pool) shares one series and one set of zero figures
    idle, nothing = series_of([Amounts()] * hours), Amounts().figures(w)

    def figures(amounts: dict[str, Amounts], wid: str) -> schemas.ContributionFigures:
        a = amounts.get(wid)
        return a.figures(w) if a is not None else nothing

    donors = []
    for wid in set(all_time) | {
        k for k, wk in workers.items() if wk.revoked_at is None and wk.left_at is None
    }:
        wk = workers.get(wid)
        series = slots.get(wid)
        donors.append(
            schemas.DonorContribution(
                worker_id=wid,
                name=wk.name if wk is not None else "",
                tier=wk.tier if wk is not None else "",
                cluster=wk.cluster if wk is not None else "",
                today=figures(today, wid),
                last_7d=figures(last_7d, wid),
                all_time=figures(all_time, wid),
                series=series_of(series) if series else idle,
            )
        )
    donors.sort(key=lambda d: (-d.all_time.credits, -d.all_time.requests, d.worker_id))
    return schemas.ContributionsOut(generated_at=now, day_start=day_start, weights=w, donors=donors)


def cached_overview(state: AppState, session: Session, hours: int = 24) -> schemas.ContributionsOut:
    """overview(), computed once per collector pass and minute (the rows change only then): every open
    registry page asks every 5 s."""
    collector = state.reconciler.collector if state.reconciler is not None else None
    if collector is None:
        return overview(state, session, hours=hours)
    key = (collector.view.passes, utcnow().replace(second=0, microsecond=0))
    hit = collector.ledger.get(hours)
    if hit is not None and hit[0] == key:
        return hit[1]  # type: ignore[no-any-return]
    out = overview(state, session, hours=hours)
    collector.ledger[hours] = (key, out)
    return out


def sparkline(values: Iterable[float], width: int = 120, height: int = 24) -> str:
    """The `points` of an SVG polyline for a series (the page draws it inline: no script, no library)."""
    vs = [float(v or 0) for v in values]
    if not vs:
        return ""
    top = max(vs) or 1.0
    step = width / max(1, len(vs) - 1)
    return " ".join(f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(vs))
