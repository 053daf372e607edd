"""Data stores in the registry: supervisors report (PUT /api/stores/{name}), admins list (GET /api/admin/stores).

A donor's node credential may only report a store that runs on itself and only if it is a trusted data-tier
donor: an untrusted donor cannot put a store in the listing. The head reports with the pool's admin key."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import Store, Worker, utcnow
from admission.security import AdminPrincipal, NodePrincipal

REPORT_EVERY_S = 10.0
STALE_AFTER_S = 3 * REPORT_EVERY_S


def report(session: Session, who: AdminPrincipal | NodePrincipal, name: str, body: schemas.StoreReport) -> None:
    worker_id: str | None = None
    if isinstance(who, NodePrincipal):
        w = session.get(Worker, who.worker_id)
        if w is None or not (w.trusted and w.tier == "data"):
            raise ApiError(403, "not_trusted_data", "only a trusted data-tier donor may run and report a store")
        worker_id = w.id
    row = session.get(Store, name) or Store(name=name)
    for field, value in body.model_dump().items():
        setattr(row, field, value)
    row.worker_id, row.reported_at = worker_id, utcnow()
    session.add(row)


def list_all(session: Session, pending: dict[str, dict[str, str]] | None = None) -> list[schemas.StoreOut]:
    """Every reported store; `pending` (from the reconciler's view of Ray) adds the supervisors that wait for a
    node, with the label selector nobody matches."""
    now = utcnow()
    names = {w.id: w.name for w in session.scalars(select(Worker))}
    out = []
    for r in session.scalars(select(Store).order_by(Store.name)):
        age = (now - r.reported_at).total_seconds()
        out.append(schemas.StoreOut(
            name=r.name, runtime=r.runtime, status=r.status if age <= STALE_AFTER_S else "unknown",
            reported_status=r.status, error=r.error, node=r.worker_id or "head",
            worker_name=names.get(r.worker_id) if r.worker_id else None, node_id=r.node_id, node_ip=r.node_ip,
            port=r.port, size_bytes=r.size_bytes, restarts=r.restarts, ready_s=r.ready_s, reported_at=r.reported_at,
            seconds_since_report=round(age, 1)))
    for name, selector in sorted((pending or {}).items()):
        why = ("waiting for a node labelled " + ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
               + " (no such donor is online: invite one with --trusted --tier data)")
        row = next((o for o in out if o.name == name), None)
        if row is None:
            out.append(schemas.StoreOut(name=name, runtime="", status="pending", reported_status="", error=why,
                                        node="", worker_name=None, node_id="", node_ip="", port=0, size_bytes=0,
                                        restarts=0, ready_s=None, reported_at=now, seconds_since_report=0.0))
        else:
            row.status, row.error = "pending", why
    return out
