"""The donor side: register with a join token, then heartbeat and unregister with the node token."""

from __future__ import annotations

from fastapi import APIRouter, Response

from admission import schemas, security
from admission.deps import ClientIp, JoinCreds, NodeDep, SessionDep, State
from admission.services import workers

router = APIRouter(prefix="/api/worker", tags=["worker"])


@router.post("/register", status_code=201, response_model=schemas.RegisterResponse, openapi_extra=security.JOIN)
def register(req: schemas.RegisterRequest, creds: JoinCreds, session: SessionDep, state: State, ip: ClientIp
             ) -> schemas.RegisterResponse:
    return workers.register(state, session, creds, req, ip)


@router.post("/heartbeat", response_model=schemas.HeartbeatResponse, openapi_extra=security.NODE)
async def heartbeat(req: schemas.HeartbeatRequest, node: NodeDep, state: State) -> schemas.HeartbeatResponse:
    return workers.heartbeat(state, node, req)


@router.delete("/unregister", status_code=204, openapi_extra=security.NODE)
def unregister(node: NodeDep, session: SessionDep, state: State, ip: ClientIp) -> Response:
    workers.unregister(state, session, node, ip)
    return Response(status_code=204)
