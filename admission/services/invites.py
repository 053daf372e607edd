"""Invites: single-use (by default), short-lived join tokens; only their hashes are stored."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import Invite, utcnow
from admission.services import audit
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.settings import Settings


def status_of(invite: Invite, now: datetime | None = None) -> str:
    now = now or utcnow()
    if invite.revoked_at is not None:
        return "revoked"
    if invite.uses_left <= 0:
        return "used"
    if invite.expires_at <= now:
        return "expired"
    return "active"


def to_out(invite: Invite) -> schemas.InviteOut:
    return schemas.InviteOut(
        id=invite.id,
        created_at=invite.created_at,
        expires_at=invite.expires_at,
        uses=invite.uses,
        uses_left=invite.uses_left,
        trusted=invite.trusted,
        tier=invite.tier,
        note=invite.note,
        status=status_of(invite),
        edge=invite.edge,
    )


def check_edge(settings: Settings, trusted: bool, edge: str | None) -> None:
    """An invite's edge must be one this coordinator knows, and only for an untrusted donor (trusted donors
    join the core, where the data is)."""
    if edge is None:
        return
    if trusted:
        raise ApiError(
            422,
            "invalid_request",
            "edge: a trusted donor joins the core cluster; drop --edge or make the invite untrusted",
        )
    if settings.edge(edge) is None:
        known = ", ".join(e.name for e in settings.edges) or "none (this pool runs without edges)"
        raise ApiError(422, "unknown_edge", f"edge: no edge cluster {edge!r}; known edges: {known}")


def create(
    session: Session, settings: Settings, req: schemas.InviteCreate, actor: str, ip: str
) -> schemas.InviteCreated:
    ttl = req.ttl_s if req.ttl_s is not None else settings.invite_default_ttl_s
    if ttl > settings.invite_max_ttl_s:
        raise ApiError(
            422,
            "invalid_request",
            f"ttl_s: at most {settings.invite_max_ttl_s} s (RMA_INVITE_MAX_TTL_S); got {ttl}",
        )
    check_edge(settings, req.trusted, req.edge)
    minted = credentials.mint(Kind.JOIN)
    invite = Invite(
        id=minted.id,
        token_hash=minted.hash,
        expires_at=utcnow() + timedelta(seconds=ttl),
        uses=req.uses,
        uses_left=req.uses,
        trusted=req.trusted,
        tier=str(req.tier) if req.tier else None,
        note=req.note,
        created_by=actor,
        edge=req.edge,
    )
    session.add(invite)
    audit.record(
        session,
        actor,
        "invite.create",
        minted.id,
        ip,
        ttl_s=ttl,
        uses=req.uses,
        trusted=req.trusted,
        tier=invite.tier,
        **({"edge": req.edge} if req.edge else {}),
    )
    session.flush()
    return schemas.InviteCreated(
        id=invite.id, token=minted.token, expires_at=invite.expires_at, uses=invite.uses
    )


def list_all(session: Session, limit: int = 200) -> list[schemas.InviteOut]:
    return [
        to_out(i) for i in session.scalars(select(Invite).order_by(Invite.created_at.desc()).limit(limit))
    ]


def revoke(session: Session, invite_id: str, actor: str, ip: str) -> schemas.InviteOut:
    invite = session.get(Invite, invite_id)
    if invite is None:
        raise ApiError(404, "not_found", f"no invite {invite_id}")
    if invite.revoked_at is None:
        invite.revoked_at = utcnow()
        audit.record(session, actor, "invite.revoke", invite_id, ip)
    return to_out(invite)


def consume(session: Session, invite_id: str) -> bool:
    """Take one use, atomically: of N concurrent redemptions of the last use, exactly one gets True."""
    result = cast(
        CursorResult[Any],
        session.execute(
            update(Invite)
            .where(
                Invite.id == invite_id,
                Invite.uses_left > 0,
                Invite.revoked_at.is_(None),
                Invite.expires_at > utcnow(),
            )
            .values(uses_left=Invite.uses_left - 1)
            .execution_options(synchronize_session=False)
        ),
    )  # an UPDATE: a cursor result, with its row count
    return result.rowcount == 1
