"""Donors: registration (the tier decision), heartbeats, leaving, revocation, and the status the registry shows.

Status is derived, not stored: from the last heartbeat (healthy, warning after one missed beat, offline after
two and a half intervals) and, once `rma up` wires a Ray head, from what Ray reports, whichever knows first.
"""

from __future__ import annotations

import logging
import socket
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import Invite, TierDemand, Worker, utcnow
from admission.security import NodePrincipal, auth_failed
from admission.services import audit, invites, overlay
from admission.state import AppState, Beat, NodeEntry
from rma_ray import credentials, tiers
from rma_ray.credentials import Kind
from rma_ray.edges import CORE
from rma_ray.settings import Settings
from rma_ray.tiers import Tier
from rma_ray.wire import PAUSED_STATES

log = logging.getLogger("rma.admission.workers")


def _refuse(
    state: AppState,
    session: Session,
    ip: str,
    status: int,
    code: str,
    message: str,
    actor: str = "anonymous",
    action: str = "worker.register.refused",
    target: str = "",
    **detail: object,
) -> ApiError:
    """A refusal the admin should see in the audit log: nothing else of this request is kept, the audit row is.
    At most one row per IP a minute (a valid token, a join token or a refused donor's node token, is not spent
    by a refusal, so it could be replayed forever): the row's `count` says how many refusals from that IP it
    stands for."""
    state.metrics.refusals.labels(code).inc()
    session.rollback()
    count = state.limiter.audit_refusal(ip, action.removeprefix("worker.").removesuffix(".refused"))
    if count is not None:
        audit.record(session, actor, action, target, ip, code=code, count=count, **detail)
        session.commit()
    return ApiError(status, code, message)


def demand(session: Session, cluster: str = CORE) -> dict[str, int]:
    """Replicas pending per tier in one cluster (an edge's demand steers only its own donors)."""
    rows = session.scalars(select(TierDemand).where(TierDemand.cluster == cluster))
    return {row.tier: row.pending for row in rows}


def cluster_for(settings: Settings, invite: Invite) -> str | ApiError:
    """The cluster an invite admits into: trusted donors join the core; untrusted ones join the invite's edge
    (default the first) where the coordinator has edges, else the core as before."""
    if invite.trusted or not settings.edges:
        if invite.edge is not None and not invite.trusted:  # its edge was configured when it was minted
            return ApiError(
                409,
                "edge_gone",
                f"this invite admits into edge cluster {invite.edge!r}, which this pool no longer runs; "
                "ask the pool admin for a new invite (the join token was not used)",
            )
        return CORE
    name = invite.edge or settings.edges[0].name
    if settings.edge(name) is None:
        known = ", ".join(e.name for e in settings.edges)
        return ApiError(
            409,
            "edge_gone",
            f"this invite admits into edge cluster {name!r}, which this pool no longer runs (edges: {known}); "
            "ask the pool admin for a new invite (the join token was not used)",
        )
    return name


def _label_cluster(settings: Settings, cluster: str) -> str | None:
    return cluster if settings.edges or cluster != CORE else None


def register(
    state: AppState, session: Session, parsed: credentials.Parsed, req: schemas.RegisterRequest, ip: str
) -> schemas.RegisterResponse:
    """Admit a donor: rate limits and the token's shape were checked by the route's dependency."""
    invite = session.get(Invite, parsed.id)
    if invite is None or not credentials.matches(parsed, invite.token_hash):
        raise auth_failed(
            state,
            ip,
            "join",
            "invalid_join_token",
            "unknown join token; check you copied all of it",
            parsed.id,
        )
    why = invites.status_of(invite)
    if why == "expired":
        raise auth_failed(
            state,
            ip,
            "join",
            "token_expired",
            f"join token expired at {invite.expires_at:%Y-%m-%d %H:%M} UTC; ask the pool admin for a "
            "new invite",
            parsed.id,
        )
    if why == "used":
        raise auth_failed(
            state,
            ip,
            "join",
            "token_used",
            "join token already used; ask the pool admin for a new invite",
            parsed.id,
        )
    if why == "revoked":
        raise auth_failed(
            state, ip, "join", "token_revoked", "join token was revoked by the pool admin", parsed.id
        )

    caps = req.capabilities
    candidates = tiers.eligible(caps)
    if not candidates:
        raise _refuse(
            state, session, ip, 422, "hardware_below_minimum", tiers.refusal(caps), invite=invite.id
        )
    pinned = Tier(invite.tier) if invite.tier else None
    if pinned is not None and pinned not in candidates:
        raise _refuse(
            state, session, ip, 422, "tier_not_qualified", tiers.pin_refusal(pinned, caps), invite=invite.id
        )
    cluster = cluster_for(state.settings, invite)
    if isinstance(cluster, ApiError):
        raise _refuse(state, session, ip, cluster.status, cluster.code, cluster.message, invite=invite.id)
    tier = tiers.choose(candidates, demand(session, cluster), pinned)
    refusal = overlay.check_request(state.settings, session, req.overlay) or unplaceable(
        state.settings, cluster
    )
    if refusal is not None:
        raise _refuse(state, session, ip, refusal.status, refusal.code, refusal.message, invite=invite.id)

    if not invites.consume(session, invite.id):  # lost the race for the last use
        raise auth_failed(
            state,
            ip,
            "join",
            "token_used",
            "join token already used; ask the pool admin for a new invite",
            parsed.id,
        )

    minted = credentials.mint(Kind.NODE)
    labels = tiers.node_labels(tier, minted.id, invite.trusted, caps, _label_cluster(state.settings, cluster))
    worker = Worker(
        id=minted.id,
        name=req.name,
        invite_id=invite.id,
        tier=str(tier),
        trusted=invite.trusted,
        capabilities=caps.model_dump(),
        labels=labels,
        node_token_hash=minted.hash,
        registered_ip=ip,
        cluster=cluster,
    )
    session.add(worker)
    audit.record(
        session,
        f"invite:{invite.id}",
        "worker.register",
        worker.id,
        ip,
        tier=str(tier),
        name=req.name,
        trusted=invite.trusted,
        candidates=[str(t) for t in candidates],
        **({"cluster": cluster} if cluster != CORE else {}),
    )
    session.flush()
    overlay_info = overlay.admit(state, session, worker, req.overlay)  # may refuse: nothing is committed then
    state.metrics.registrations.labels(str(tier)).inc()
    with state.nodes_lock:
        state.nodes[worker.id] = NodeEntry(
            worker.id, minted.hash, True, cluster=cluster, trusted=bool(worker.trusted)
        )

    settings = state.settings
    return schemas.RegisterResponse(
        worker_id=worker.id,
        tier=tier,
        tier_number=tier.number,
        trusted=invite.trusted,
        labels=labels,
        node_token=minted.token,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        ray=_ray(settings, cluster),
        overlay=overlay_info,
        cluster=cluster,
    )


def _ray(settings: Settings, cluster: str = CORE) -> schemas.RayInfo | None:
    """The donor's own cluster: an edge donor gets its edge's address and token, nothing of the core's."""
    address = settings.cluster_address(cluster)
    if not address:
        return None
    return schemas.RayInfo(address=address, auth_token=settings.cluster_token(cluster), cluster=cluster)


def unplaceable(settings: Settings, cluster: str = CORE) -> ApiError | None:
    """Before a join token is spent: a donor this coordinator cannot place (no Ray head, or a head it cannot
    reach) is refused, with the reason, and keeps its invite."""
    if cluster != CORE:
        address = settings.cluster_address(cluster)
        if address is None:
            return ApiError(
                409,
                "edge_gone",
                f"this donor belongs to edge cluster {cluster!r}, which this pool no longer runs; "
                "ask the pool admin (the join token was not used)",
            )
        return _reachable(address, f"the pool's edge cluster {cluster!r}")
    if not settings.ray_address:
        if settings.admit_without_ray:
            return None
        return ApiError(
            409,
            "no_ray_head",
            "this coordinator runs without a Ray head (`rma admission serve` "
            "alone) and admits no one; ask the admin for a pool started with "
            "`rma up` (the join token was not used)",
        )
    return _reachable(settings.ray_address, "the pool's Ray head")


def _reachable(address: str, what: str) -> ApiError | None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError) as exc:
        log.error("Ray head %s unreachable: %s", address, exc)
        return ApiError(
            409,
            "ray_head_unreachable",
            f"{what} does not answer; tell the pool admin and try again later (the join token was not used)",
        )
    return None


UNTRUSTED_IN_CORE = (
    "this pool now admits untrusted donors into an edge cluster: ask the admin for a new invite"
)


def untrusted_in_core(settings: Settings, worker: Worker) -> ApiError | None:
    """An untrusted donor registered in the core before the pool had edges (migration 0007 put every donor in
    'core'): once edges exist it must get nothing of the core again (neither its address nor its token on
    rejoin or `GET /api/worker/ray`); it joins an edge with a new invite."""
    if settings.edges and not worker.trusted and worker.cluster == CORE:
        return ApiError(409, "untrusted_in_core", UNTRUSTED_IN_CORE)
    return None


def _rejoin_refusal(worker: Worker) -> ApiError | None:
    if worker.revoked_at is not None:
        return ApiError(
            403,
            "worker_revoked",
            f"donor {worker.id} was revoked by the pool admin on "
            f"{worker.revoked_at:%Y-%m-%d %H:%M} UTC; it cannot rejoin",
        )
    if worker.left_at is not None:
        return ApiError(
            403,
            "worker_left",
            f"donor {worker.id} left the pool; to come back, join with a new "
            f"invite (`rma join <coordinator-url> --token-file <file>`)",
        )
    if worker.quarantine_reason:
        return ApiError(
            403,
            "quarantined",
            f"donor {worker.id} is quarantined: {worker.quarantine_reason}; ask the pool admin",
        )
    return None


def rejoin(
    state: AppState, session: Session, parsed: credentials.Parsed, req: schemas.RejoinRequest, ip: str
) -> schemas.RejoinResponse:
    """A known donor after a reboot or an agent restart: the same id and node token, no invite spent. The
    hardware is re-probed and the tier checked again; a new overlay key replaces the old one."""
    worker = session.get(Worker, parsed.id)
    if worker is None or not credentials.matches(parsed, worker.node_token_hash):
        raise auth_failed(state, ip, "node", "invalid_node_token", "unknown node token")
    refusal = _rejoin_refusal(worker) or untrusted_in_core(state.settings, worker)
    if refusal is None:
        caps = req.capabilities
        candidates = tiers.eligible(caps)
        if not candidates:
            refusal = ApiError(422, "hardware_below_minimum", tiers.refusal(caps))
    if refusal is None:
        invite = session.get(Invite, worker.invite_id) if worker.invite_id else None
        pinned = Tier(invite.tier) if invite is not None and invite.tier else None
        if pinned is not None and pinned not in candidates:
            refusal = ApiError(422, "tier_not_qualified", tiers.pin_refusal(pinned, caps))
    if refusal is None and req.overlay is not None and req.overlay.public_key != worker.wg_public_key:
        refusal = overlay.check_request(state.settings, session, req.overlay)
    if refusal is None and state.settings.overlay_enabled and req.overlay is None:
        refusal = overlay.check_request(state.settings, session, None)
    refusal = refusal or unplaceable(state.settings, worker.cluster)
    if refusal is not None:
        raise _refuse(
            state,
            session,
            ip,
            refusal.status,
            refusal.code,
            refusal.message,
            actor=f"worker:{worker.id}",
            action="worker.rejoin.refused",
            target=worker.id,
        )

    tier = Tier(worker.tier)
    if tier not in candidates:
        tier = tiers.choose(candidates, demand(session, worker.cluster), pinned)
    worker.tier, worker.capabilities = str(tier), caps.model_dump()
    worker.labels = tiers.node_labels(
        tier, worker.id, worker.trusted, caps, _label_cluster(state.settings, worker.cluster)
    )
    worker.ray_alive, worker.ray_node_id = None, None
    overlay_info = None
    if state.settings.overlay_enabled and req.overlay is not None:
        # off the hub with the old key and address, on again with the one the donor has now (a new key when
        # the old one is gone); the replaced key is kept in the audit trail
        old_key = worker.wg_public_key
        overlay.cut(state, worker)
        session.flush()
        overlay_info = overlay.admit(state, session, worker, req.overlay)
        if old_key != req.overlay.public_key:
            audit.record(
                session, f"worker:{worker.id}", "worker.overlay_key", worker.id, ip, replaced=old_key
            )
    audit.record(
        session, f"worker:{worker.id}", "worker.rejoin", worker.id, ip, tier=str(tier), name=req.name
    )
    session.flush()
    with state.nodes_lock:
        state.nodes[worker.id] = NodeEntry(
            worker.id, worker.node_token_hash, True, worker.action, worker.cluster, bool(worker.trusted)
        )
    s = state.settings
    return schemas.RejoinResponse(
        worker_id=worker.id,
        tier=tier,
        tier_number=tier.number,
        trusted=worker.trusted,
        labels=worker.labels,
        heartbeat_interval_s=s.heartbeat_interval_s,
        ray=_ray(s, worker.cluster),
        overlay=overlay_info,
        cluster=worker.cluster,
    )


def abort(state: AppState, session: Session, node: NodePrincipal, ip: str) -> schemas.AbortResponse:
    """The donor could not start (overlay or Ray failed): end a registration that never heartbeated and give
    its invite use back. One conditional UPDATE decides, so a replay or a race refunds at most once, and never
    past the invite's uses; a registration that ever ran is left the ordinary way, without a refund."""
    ended = (
        session.execute(
            update(Worker)
            .where(
                Worker.id == node.worker_id,
                Worker.last_heartbeat_at.is_(None),
                Worker.left_at.is_(None),
                Worker.revoked_at.is_(None),
            )
            .values(left_at=utcnow(), action="leave")
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        == 1
        and state.buffer.peek(node.worker_id) is None
    )
    worker = session.get(Worker, node.worker_id)
    assert worker is not None  # the node token was just verified against it
    session.refresh(worker)
    if not ended:
        if worker.left_at is None:
            worker.left_at, worker.action = utcnow(), "leave"
        audit.record(session, node.actor, "worker.unregister", worker.id, ip)
    else:
        if worker.invite_id:
            session.execute(
                update(Invite)
                .where(Invite.id == worker.invite_id, Invite.uses_left < Invite.uses)
                .values(uses_left=Invite.uses_left + 1)
                .execution_options(synchronize_session=False)
            )
        audit.record(session, node.actor, "worker.register.aborted", worker.id, ip, invite=worker.invite_id)
    overlay.cut(state, worker)
    session.flush()
    _deactivate(state, worker.id)
    return schemas.AbortResponse(refunded=ended)


def heartbeat(state: AppState, node: NodePrincipal, req: schemas.HeartbeatRequest) -> tuple[str, str]:
    """Record the beat in memory (flushed in bulk); return the action the donor must take and its cluster."""
    state.buffer.put(
        node.worker_id,
        Beat(
            utcnow(),
            req.status,
            req.current_load,
            req.available_memory_mb,
            req.ray_node_id,
            req.resume_at if req.status == "off_schedule" else None,
        ),
    )
    state.metrics.heartbeats.inc()
    with state.nodes_lock:
        entry = state.nodes[node.worker_id]
        stranger = state.settings.edges and not entry.trusted and entry.cluster == CORE
        if stranger and entry.action != "leave":
            # an untrusted donor admitted into the core before the pool had edges: told to leave whatever
            # else it was told (the core is not shared with strangers); it comes back into an edge with a new
            # invite
            log.warning("donor %s is untrusted and in the core cluster: asking it to leave", node.worker_id)
            entry.action = "leave"
        return entry.action, entry.cluster


def ray_info(state: AppState, session: Session, node: NodePrincipal) -> schemas.RayInfo:
    worker = _get(session, node.worker_id)
    if worker.quarantine_reason:
        raise ApiError(403, "quarantined", f"this donor is quarantined: {worker.quarantine_reason}")
    refusal = untrusted_in_core(state.settings, worker)
    if refusal is not None:
        raise refusal
    info = _ray(state.settings, worker.cluster)
    if info is None:
        if worker.cluster != CORE:
            raise ApiError(409, "edge_gone", f"this pool no longer runs edge cluster {worker.cluster!r}")
        raise ApiError(409, "no_ray_head", "this coordinator runs without a Ray head")
    return info


def _deactivate(state: AppState, worker_id: str, action: str = "leave") -> None:
    with state.nodes_lock:
        entry = state.nodes.get(worker_id)
        if entry is not None:
            entry.active, entry.action = False, action
    state.buffer.drop(worker_id)


def unregister(state: AppState, session: Session, node: NodePrincipal, ip: str) -> None:
    worker = session.get(Worker, node.worker_id)
    assert worker is not None  # the node token was just verified against it
    worker.left_at = utcnow()
    worker.action = "leave"
    audit.record(session, node.actor, "worker.unregister", worker.id, ip)
    overlay.cut(state, worker)
    session.flush()
    _deactivate(state, worker.id)


def _get(session: Session, worker_id: str) -> Worker:
    worker = session.get(Worker, worker_id)
    if worker is None:
        raise ApiError(404, "not_found", f"no worker {worker_id}; `rma donors list` shows the ids")
    return worker


def revoke(state: AppState, session: Session, worker_id: str, actor: str, ip: str) -> schemas.WorkerOut:
    worker = _get(session, worker_id)
    if worker.revoked_at is None:
        worker.revoked_at = utcnow()
        worker.action = "leave"
        audit.record(session, actor, "worker.revoke", worker.id, ip, tier=worker.tier, name=worker.name)
        overlay.cut(state, worker)  # off the hub before this request returns: its traffic stops now
        session.flush()
        _deactivate(state, worker.id)
    return to_out(state, worker)


def set_action(
    state: AppState, session: Session, worker_id: str, action: str, actor: str, ip: str
) -> schemas.WorkerOut:
    worker = _get(session, worker_id)
    if worker.revoked_at is not None or worker.left_at is not None:
        raise ApiError(409, "conflict", f"worker {worker_id} has already left the pool")
    worker.action = action
    audit.record(session, actor, f"worker.{'drain' if action == 'drain' else 'resume'}", worker.id, ip)
    session.flush()
    with state.nodes_lock:
        entry = state.nodes.get(worker.id)
        if entry is not None:
            entry.action = action
    return to_out(state, worker)


def derive_status(
    worker: Worker, last_beat: datetime | None, interval_s: int, now: datetime, beat_status: str | None = None
) -> str:
    """Offline as soon as either source says so: heartbeats stopped, or Ray saw the node die after the last
    beat. A donor that stepped aside on purpose (paused, off schedule, yielding to its owner) stopped its Ray
    node but keeps heartbeating: it shows that state, never offline, while its beats arrive."""
    if worker.revoked_at is not None:
        return "revoked"
    if worker.left_at is not None:
        return "left"
    if worker.quarantine_reason:
        return "quarantined"
    status = beat_status if beat_status is not None else worker.heartbeat_status
    if status in PAUSED_STATES and last_beat and now - last_beat <= timedelta(seconds=2.5 * interval_s):
        return status
    if (
        worker.ray_alive is False
        and worker.ray_seen_at
        and (last_beat is None or worker.ray_seen_at >= last_beat)
    ):
        return "offline"
    if last_beat is None:
        return "joining" if now - worker.created_at < timedelta(seconds=2.5 * interval_s) else "offline"
    age = now - last_beat
    if age <= timedelta(seconds=1.5 * interval_s):
        return "healthy"
    if age <= timedelta(seconds=2.5 * interval_s):
        return "warning"
    return "offline"


def to_out(state: AppState, worker: Worker, now: datetime | None = None) -> schemas.WorkerOut:
    beat = state.buffer.peek(worker.id)
    last_beat = beat.at if beat else worker.last_heartbeat_at
    seen = max((t for t in (last_beat, worker.ray_seen_at if worker.ray_alive else None) if t), default=None)
    status = derive_status(
        worker, last_beat, state.settings.heartbeat_interval_s, now or utcnow(), beat.status if beat else None
    )
    resume_at = (beat.resume_at if beat else worker.resume_at) if status == "off_schedule" else None
    return schemas.WorkerOut(
        id=worker.id,
        name=worker.name,
        tier=worker.tier,
        trusted=worker.trusted,
        status=status,
        labels=worker.labels,
        capabilities=worker.capabilities,
        created_at=worker.created_at,
        last_seen_at=seen,
        current_load=beat.current_load if beat else worker.current_load,
        available_memory_mb=beat.available_memory_mb if beat else worker.available_memory_mb,
        ray_node_id=(beat.ray_node_id if beat else None) or worker.ray_node_id,
        ray_alive=worker.ray_alive,
        action=worker.action,
        quarantine_reason=worker.quarantine_reason,
        revoked_at=worker.revoked_at,
        overlay_ip=worker.overlay_ip,
        cluster=worker.cluster,
        resume_at=resume_at,
    )


def list_all(
    state: AppState,
    session: Session,
    tier: str | None = None,
    status: str | None = None,
    cluster: str | None = None,
) -> list[schemas.WorkerOut]:
    q = select(Worker).order_by(Worker.created_at)
    if tier:
        q = q.where(Worker.tier == tier)
    if cluster:
        q = q.where(Worker.cluster == cluster)
    now = utcnow()
    out = [to_out(state, w, now) for w in session.scalars(q)]
    return [w for w in out if status is None or w.status == status]


def get(state: AppState, session: Session, worker_id: str) -> schemas.WorkerOut:
    return to_out(state, _get(session, worker_id))
