"""The seed's dashboard figures: workers by tier and status, capacity by tier, unmet demand, health; and what the
unauthenticated /healthz and /metrics cost, which must not grow with the registry (an open flood target)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

from sqlalchemy import ColumnElement, case, func, select, text
from sqlalchemy.orm import Session

from admission import schemas
from admission.models import ClientKey, Invite, Worker, utcnow
from admission.services import workers
from admission.state import AppState
from rma_ray.tiers import TIER_ORDER
from rma_ray.wire import PAUSED_STATES

ONLINE = {"healthy", "warning"}


def stats(state: AppState, session: Session) -> schemas.StatsOut:
    all_workers = workers.list_all(state, session)
    pending: Counter[str] = Counter()
    for cluster in state.settings.clusters:  # every cluster's pending replicas, per tier
        pending.update(workers.demand(session, cluster))
    tiers: dict[str, schemas.TierStats] = {}
    for tier in map(str, TIER_ORDER):
        mine = [w for w in all_workers if w.tier == tier]
        online = [w for w in mine if w.status in ONLINE]
        caps = [w.capabilities for w in online]
        tiers[tier] = schemas.TierStats(
            workers=dict(Counter(w.status for w in mine)),
            online=len(online),
            capacity={
                "cpu_cores": float(sum(c.get("cpu_cores", 0) for c in caps)),
                "ram_mb": float(sum(c.get("ram_mb", 0) for c in caps)),
                "gpus": float(sum(len(c.get("gpus", [])) for c in caps)),
                "gpu_memory_mb": float(sum(g.get("memory_mb", 0) for c in caps for g in c.get("gpus", []))),
                "disk_free_gb": float(sum(c.get("disk_free_gb", 0) for c in caps)),
            },
            demand=pending.get(tier, 0),
        )
    now = utcnow()
    invites_active = (
        session.scalar(
            select(func.count())
            .select_from(Invite)
            .where(Invite.revoked_at.is_(None), Invite.uses_left > 0, Invite.expires_at > now)
        )
        or 0
    )
    clients_active = (
        session.scalar(select(func.count()).select_from(ClientKey).where(ClientKey.revoked_at.is_(None))) or 0
    )
    return schemas.StatsOut(
        tiers=tiers,
        total_workers=len(all_workers),
        online_workers=sum(t.online for t in tiers.values()),
        invites_active=invites_active,
        clients_active=clients_active,
        generated_at=now,
    )


def health(state: AppState, session: Session) -> schemas.HealthOut:
    try:
        session.execute(text("SELECT 1"))
        db = "ok"
    except Exception as exc:  # the health page must answer even when the database does not
        db = f"error: {type(exc).__name__}"
    online = total = 0
    if db == "ok":
        ws = workers.list_all(state, session)
        total = len(ws)
        online = sum(1 for w in ws if w.status in ONLINE)
    return schemas.HealthOut(
        status="ok" if db == "ok" else "degraded",
        database=db,
        ray_configured=bool(state.settings.ray_address),
        workers_online=online,
        workers_total=total,
    )


def alive(state: AppState) -> bool:
    """Liveness for /healthz: the process answers and the database does (`SELECT 1`), nothing that grows."""
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


LIVE_STATUSES = ("joining", "healthy", "warning", "offline", "quarantined", *PAUSED_STATES)
GAUGE_TTL_S = 5.0
_refreshing = threading.Lock()


def _status_sql(interval_s: int) -> ColumnElement[str]:
    """workers.derive_status as SQL, for live rows (from the flushed heartbeats: at most heartbeat_flush_s old)."""
    now = utcnow()
    beat = Worker.last_heartbeat_at
    return case(
        (Worker.quarantine_reason.is_not(None) & (Worker.quarantine_reason != ""), "quarantined"),
        *(  # stepped aside on purpose, still heartbeating: never offline
            (
                (Worker.heartbeat_status == st) & (beat >= now - timedelta(seconds=2.5 * interval_s)),
                st,
            )
            for st in PAUSED_STATES
        ),
        (
            Worker.ray_alive.is_(False)
            & Worker.ray_seen_at.is_not(None)
            & (beat.is_(None) | (Worker.ray_seen_at >= beat)),
            "offline",
        ),
        (beat.is_(None) & (Worker.created_at >= now - timedelta(seconds=2.5 * interval_s)), "joining"),
        (beat.is_(None), "offline"),
        (beat >= now - timedelta(seconds=1.5 * interval_s), "healthy"),
        (beat >= now - timedelta(seconds=2.5 * interval_s), "warning"),
        else_="offline",
    )


def refresh_gauges(state: AppState) -> None:
    """The workers-by-tier-and-status gauge for /metrics: one aggregate query over live rows (no row reaches
    Python), at most once every GAUGE_TTL_S; concurrent scrapes meanwhile get the last figures."""
    if time.monotonic() - state.gauges_at < GAUGE_TTL_S or not _refreshing.acquire(blocking=False):
        return
    try:
        status = _status_sql(state.settings.heartbeat_interval_s).label("status")
        q = (
            select(Worker.tier, status, func.count())
            .where(Worker.revoked_at.is_(None), Worker.left_at.is_(None))
            .group_by(Worker.tier, status)
        )
        with state.engine.connect() as conn:
            counts = {(tier, st): n for tier, st, n in conn.execute(q)}
        for tier in map(str, TIER_ORDER):
            for st in LIVE_STATUSES:
                state.metrics.workers.labels(tier, st).set(counts.get((tier, st), 0))
        state.gauges_at = time.monotonic()
    finally:
        _refreshing.release()
