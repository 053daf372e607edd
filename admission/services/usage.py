"""Client usage on the coordinator: what the gateway replicas report (`POST /api/clients/usage`, a service
credential), for `GET /api/admin/usage` and the registry page.

The counters live in the pool's Redis store, where the gateway counts each request once; the coordinator
does not reach the stores (it is no Ray driver, and store passwords go to trusted nodes only), so the replicas
report the day's counters every ~30 s, as absolute values: a report repeated, or the same day sent by several
replicas, changes nothing (the highest value of each counter wins). Each replica's quota state (shared, or per
replica while Redis is down) is kept in memory here: it is only news while it is fresh.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from admission import schemas
from admission.models import ClientKey, ClientUsage, utcnow
from admission.services.keys import effective_quota, giving_donors
from rma_ray.settings import Settings

FRESH_S = 120.0  # a replica's state is shown while its last report is this recent
FIELDS = ("requests", "tokens_in", "tokens_out", "upload_bytes")

_lock = threading.Lock()
_replicas: dict[str, schemas.QuotaReplica] = {}


def report(session: Session, body: schemas.UsageReport, settings: Settings) -> None:
    now = utcnow()
    with _lock:
        _replicas[body.replica] = schemas.QuotaReplica(
            replica=body.replica, shared=body.shared, error=body.error, reported_at=now
        )
        for name, r in list(_replicas.items()):
            if (now - r.reported_at).total_seconds() > 24 * 3600:
                del _replicas[name]
    if not body.usage:
        return
    known = set(session.scalars(select(ClientKey.id).where(ClientKey.id.in_(list(body.usage)))))
    rows = {
        r.key_id: r
        for r in session.scalars(
            select(ClientUsage).where(ClientUsage.day == body.day, ClientUsage.key_id.in_(known))
        )
    }
    for key_id, got in body.usage.items():
        if key_id not in known:  # a key deleted since: nothing to show it under
            continue
        row = rows.get(key_id)
        if row is None:
            row = ClientUsage(key_id=key_id, day=body.day, **dict.fromkeys(FIELDS, 0))
            session.add(row)
        for f in FIELDS:
            setattr(row, f, max(getattr(row, f) or 0, getattr(got, f)))
        row.updated_at = now
    cutoff = (now - timedelta(days=settings.usage_retention_days)).strftime("%Y-%m-%d")
    session.execute(delete(ClientUsage).where(ClientUsage.day < cutoff))


def replicas(now: datetime | None = None) -> list[schemas.QuotaReplica]:
    now = now or utcnow()
    with _lock:
        return sorted(
            (r for r in _replicas.values() if (now - r.reported_at).total_seconds() <= FRESH_S),
            key=lambda r: r.replica,
        )


def summary(
    session: Session, settings: Settings, days: int = 1, key_id: str | None = None
) -> schemas.UsageOut:
    """The last `days` UTC days (today first) per client key, with each key's quota, and the replicas'
    quota state."""
    today = datetime.now(UTC).date()
    wanted = [(today - timedelta(days=i)).isoformat() for i in range(days)]
    q = (
        select(ClientUsage, ClientKey)
        .join(ClientKey, ClientKey.id == ClientUsage.key_id)
        .where(ClientUsage.day.in_(wanted))
        .order_by(ClientUsage.day.desc(), ClientUsage.requests.desc())
    )
    if key_id is not None:
        q = q.where(ClientUsage.key_id == key_id)
    found = session.execute(q).all()
    giving = giving_donors(session, settings, {k.donor_id for _, k in found if k.donor_id})
    rows = [
        schemas.ClientUsageRow(
            key_id=u.key_id,
            name=k.name,
            day=u.day,
            requests=u.requests,
            tokens_in=u.tokens_in,
            tokens_out=u.tokens_out,
            upload_bytes=u.upload_bytes,
            quota=effective_quota(k, settings, k.donor_id in giving),
            updated_at=u.updated_at,
        )
        for u, k in found
    ]
    reps = replicas()
    return schemas.UsageOut(days=wanted, clients=rows, shared=all(r.shared for r in reps), replicas=reps)
