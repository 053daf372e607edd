"""The audit trail: invites, registrations, revocations and key changes, written in the same transaction as
the change they describe (so a rolled-back change leaves no audit row either)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from admission.models import AuditEvent


def record(session: Session, actor: str, action: str, subject: str = "", ip: str = "", **detail: Any) -> None:
    session.add(AuditEvent(actor=actor, action=action, subject=subject, ip=ip, detail=detail))


def recent(session: Session, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if action:
        q = q.where(AuditEvent.action == action)
    return list(session.scalars(q))
