from __future__ import annotations

from fastapi import APIRouter

from admission import schemas, security
from admission.deps import AdminDep, ClientIp, SessionDep, State
from admission.services import invites

router = APIRouter(prefix="/api/invites", tags=["invites"])


@router.post("", status_code=201, response_model=schemas.InviteCreated, openapi_extra=security.ADMIN)
def create_invite(
    req: schemas.InviteCreate, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.InviteCreated:
    return invites.create(session, state.settings, req, admin.actor, ip)


@router.get("", response_model=list[schemas.InviteOut], openapi_extra=security.ADMIN)
def list_invites(admin: AdminDep, session: SessionDep) -> list[schemas.InviteOut]:
    return invites.list_all(session)


@router.post("/{invite_id}/revoke", response_model=schemas.InviteOut, openapi_extra=security.ADMIN)
def revoke_invite(invite_id: str, admin: AdminDep, session: SessionDep, ip: ClientIp) -> schemas.InviteOut:
    return invites.revoke(session, invite_id, admin.actor, ip)
