"""The seed's dashboard figures: workers by tier and status, capacity by tier, unmet demand, health."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from admission import schemas
from admission.models import ClientKey, Invite, utcnow
from admission.services import workers
from admission.state import AppState
from rma_ray.tiers import TIER_ORDER

ONLINE = {"healthy", "warning"}


def stats(state: AppState, session: Session) -> schemas.StatsOut:
    all_workers = workers.list_all(state, session)
    pending = workers.demand(session)
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
        for status, n in tiers[tier].workers.items():
            state.metrics.workers.labels(tier, status).set(n)
    now = utcnow()
    invites_active = session.scalar(select(func.count()).select_from(Invite).where(
        Invite.revoked_at.is_(None), Invite.uses_left > 0, Invite.expires_at > now)) or 0
    clients_active = session.scalar(select(func.count()).select_from(ClientKey).where(
        ClientKey.revoked_at.is_(None))) or 0
    return schemas.StatsOut(tiers=tiers, total_workers=len(all_workers),
                            online_workers=sum(t.online for t in tiers.values()), invites_active=invites_active,
                            clients_active=clients_active, generated_at=now)


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
    return schemas.HealthOut(status="ok" if db == "ok" else "degraded", database=db,
                             ray_configured=bool(state.settings.ray_address), workers_online=online,
                             workers_total=total)
