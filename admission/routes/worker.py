"""The donor side: register with a join token, then heartbeat and unregister with the node token."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from admission import schemas, security
from admission.deps import ClientIp, JoinCreds, NodeDep, SessionDep, State
from admission.services import workers

router = APIRouter(prefix="/api/worker", tags=["worker"])


@router.post("/register", status_code=201, response_model=schemas.RegisterResponse, openapi_extra=security.JOIN)
def register(req: schemas.RegisterRequest, creds: JoinCreds, session: SessionDep, state: State, ip: ClientIp
             ) -> schemas.RegisterResponse:
    return workers.register(state, session, creds, req, ip)


@router.post("/heartbeat", response_model=schemas.HeartbeatResponse, openapi_extra=security.NODE)
async def heartbeat(req: schemas.HeartbeatRequest, node: NodeDep, request: Request) -> Response:
    # Answered as a ready Response: FastAPI then skips re-validating the reply, which is a third of the cost
    # of this, the hottest route.
    state = security.state_of(request)
    action = workers.heartbeat(state, node, req)
    return Response(b'{"action":"%s","cluster":"%s"}' % (action.encode(), state.cluster_epoch().encode()),
                    media_type="application/json")


@router.get("/ray", response_model=schemas.RayInfo, openapi_extra=security.NODE)
def ray_info(node: NodeDep, session: SessionDep, state: State) -> schemas.RayInfo:
    """The head's address and the current cluster token, for a live donor (after a token rotation)."""
    return workers.ray_info(state, session, node)


@router.get("/me", response_model=schemas.WorkerOut, openapi_extra=security.NODE)
def me(node: NodeDep, session: SessionDep, state: State) -> schemas.WorkerOut:
    """The registry's view of this donor (for `rma status`)."""
    return workers.get(state, session, node.worker_id)


@router.delete("/unregister", status_code=204, openapi_extra=security.NODE)
def unregister(node: NodeDep, session: SessionDep, state: State, ip: ClientIp) -> Response:
    workers.unregister(state, session, node, ip)
    return Response(status_code=204)
