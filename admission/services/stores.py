"""Data stores in the registry: supervisors report (PUT /api/stores/{name}), admins list (GET /api/admin/stores).

A report is bound to its reporter. A donor's node credential may report only if it is a trusted data-tier
donor of the core cluster, only the pool's known stores, and only a store whose supervisor runs on its own Ray
node (the node id the reconciler recorded for it). The head reports with its service credential (or an admin
key). A row belongs to whoever created it (a donor, or the head): a report from anyone else is refused with
403 while the owner still reports; once the owner has been silent for STALE_AFTER_S (Ray moved the
supervisor), the new node takes it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import Store, Worker, utcnow
from admission.security import AdminPrincipal, NodePrincipal, ServicePrincipal
from rma_ray.edges import CORE
from rma_ray.head import STORE_NAMES
from rma_ray.tiers import LABEL_NODE

REPORT_EVERY_S = 10.0
STALE_AFTER_S = 3 * REPORT_EVERY_S


def _reporter(
    session: Session, who: AdminPrincipal | NodePrincipal | ServicePrincipal, body: schemas.StoreReport
) -> str | None:
    """The worker id the report speaks for (None: the head), after checking the donor may report at all."""
    if not isinstance(who, NodePrincipal):
        return None
    w = session.get(Worker, who.worker_id)
    if w is not None and w.quarantine_reason:  # drained: its node may be an impostor's
        raise ApiError(
            403, "quarantined", f"donor {w.id} is quarantined: {w.quarantine_reason}; ask the pool admin"
        )
    if w is None or not (w.trusted and w.tier == "data" and w.cluster == CORE):
        raise ApiError(403, "not_trusted_data", "only a trusted data-tier donor may run and report a store")
    if w.ray_node_id and body.node_id != w.ray_node_id:
        raise ApiError(
            403,
            "not_your_node",
            f"this report names Ray node {body.node_id[:12]}…, but this donor's node is "
            f"{w.ray_node_id[:12]}…: report only stores that run on it",
        )
    return w.id


def report(
    session: Session,
    who: AdminPrincipal | NodePrincipal | ServicePrincipal,
    name: str,
    body: schemas.StoreReport,
) -> None:
    if name not in STORE_NAMES:
        raise ApiError(
            404, "unknown_store", f"no store {name!r} in this pool; known: {', '.join(STORE_NAMES)}"
        )
    worker_id = _reporter(session, who, body)
    row = session.get(Store, name, with_for_update=True)
    now = utcnow()
    if row is None:
        row = Store(name=name)
    elif row.worker_id != worker_id and (now - row.reported_at).total_seconds() <= STALE_AFTER_S:
        owner = f"donor {row.worker_id}" if row.worker_id else "the head"
        raise ApiError(
            403,
            "store_elsewhere",
            f"store {name} is reported by {owner}, whose supervisor still "
            f"reports; a store's row takes reports from its own node only",
        )
    for field, value in body.model_dump().items():
        setattr(row, field, value)
    row.worker_id, row.reported_at = worker_id, now
    session.add(row)


def _waiting_why(
    name: str, selector: dict[str, str], names: dict[str, str], gone: dict[str, str] | None = None
) -> str:
    """Why a supervisor waits: for its pinned donor (the store's data is there), or for any node it may use.
    `gone`: donors that will not come back (revoked, left), each with the word for it: the way out is a backup."""
    donor = selector.get(LABEL_NODE)
    if donor:
        shown = f"{donor} ({names[donor]})" if names.get(donor) else donor
        if reason := (gone or {}).get(donor):
            return (
                f"waiting for {shown}, which was {reason} and will not come back with the store's data: start "
                f"it on another trusted data donor from a backup, `rma stores move {name} --to DONOR "
                f"--from-backup DIR`"
            )
        return (
            f"waiting for {shown}: the store's data is on that donor, which is offline; its supervisor starts "
            f"there when the donor is back"
        )
    return (
        "waiting for a node labelled "
        + ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
        + " (no such donor is online: invite one with --trusted --tier data)"
    )


def list_all(session: Session, pending: dict[str, dict[str, str]] | None = None) -> list[schemas.StoreOut]:
    """Every reported store; `pending` (from the reconciler's view of Ray) adds the supervisors that wait for a
    node, with the label selector nobody matches."""
    now = utcnow()
    workers = list(session.scalars(select(Worker)))
    names = {w.id: w.name for w in workers}
    gone = {w.id: "revoked" if w.revoked_at else "left" for w in workers if w.revoked_at or w.left_at}
    out = []
    for r in session.scalars(select(Store).order_by(Store.name)):
        age = (now - r.reported_at).total_seconds()
        out.append(
            schemas.StoreOut(
                name=r.name,
                runtime=r.runtime,
                status=r.status if age <= STALE_AFTER_S else "unknown",
                reported_status=r.status,
                error=r.error,
                node=r.worker_id or "head",
                worker_name=names.get(r.worker_id) if r.worker_id else None,
                node_id=r.node_id,
                node_ip=r.node_ip,
                port=r.port,
                size_bytes=r.size_bytes,
                restarts=r.restarts,
                ready_s=r.ready_s,
                reported_at=r.reported_at,
                seconds_since_report=round(age, 1),
            )
        )
    for name, selector in sorted((pending or {}).items()):
        why = _waiting_why(name, selector, names, gone)
        status = "waiting" if selector.get(LABEL_NODE) else "pending"
        row = next((o for o in out if o.name == name), None)
        if row is None:
            out.append(
                schemas.StoreOut(
                    name=name,
                    runtime="",
                    status=status,
                    reported_status="",
                    error=why,
                    node="",
                    worker_name=None,
                    node_id="",
                    node_ip="",
                    port=0,
                    size_bytes=0,
                    restarts=0,
                    ready_s=None,
                    reported_at=now,
                    seconds_since_report=0.0,
                )
            )
        else:
            row.status, row.error = status, why
    return out
