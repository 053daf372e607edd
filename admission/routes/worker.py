"""The donor side: register with a join token, then heartbeat and unregister with the node token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPBearer
from pydantic import ValidationError

from admission import errors, schemas, security
from admission.deps import ClientIp, Creds, JoinCreds, NodeDep, SessionDep, State
from admission.errors import ApiError
from admission.services import workers
from rma_ray import credentials
from rma_ray.credentials import Kind

router = APIRouter(prefix="/api/worker", tags=["worker"])


@router.post(
    "/register", status_code=201, response_model=schemas.RegisterResponse, openapi_extra=security.JOIN
)
def register(
    req: schemas.RegisterRequest, creds: JoinCreds, session: SessionDep, state: State, ip: ClientIp
) -> schemas.RegisterResponse:
    return workers.register(state, session, creds, req, ip)


_node_bearer = HTTPBearer(auto_error=False, scheme_name="NodeToken", description="rma_node_<id>_<secret>")


async def _rejoin_credentials(
    state: State, ip: ClientIp, creds: Annotated[Creds, Depends(_node_bearer)]
) -> credentials.Parsed:
    """Rate limits and the node token's shape, before the body is even read (a rejoin costs what a registration
    does, and a refused one can be replayed forever: it spends the same per-IP budget); the service checks the
    hash and says why a known donor may not come back (revoked, left, quarantined), which the usual node
    dependency folds into one answer."""
    state.limiter.hit_register(ip)
    security.check_node_allowed(state, ip, creds)
    return security.parse_bearer(state, ip, creds, Kind.NODE)


@router.post("/rejoin", response_model=schemas.RejoinResponse, openapi_extra=security.NODE)
def rejoin(
    req: schemas.RejoinRequest,
    creds: Annotated[credentials.Parsed, Depends(_rejoin_credentials)],
    session: SessionDep,
    state: State,
    ip: ClientIp,
) -> schemas.RejoinResponse:
    """A known donor after a reboot or restart: same id, re-probed hardware, no invite spent."""
    return workers.rejoin(state, session, creds, req, ip)


@router.post("/abort", response_model=schemas.AbortResponse, openapi_extra=security.NODE)
def abort(node: NodeDep, session: SessionDep, state: State, ip: ClientIp) -> schemas.AbortResponse:
    """The donor could not start its overlay or Ray node: end the registration; an invite use is given back
    when it never heartbeated."""
    return workers.abort(state, session, node, ip)


_HEARTBEAT_DOC = {
    **security.NODE,
    "security": [{"NodeToken": []}],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": schemas.HeartbeatRequest.model_json_schema()}},
    },
}


@router.post("/heartbeat", response_model=schemas.HeartbeatResponse, openapi_extra=_HEARTBEAT_DOC)
async def heartbeat(request: Request) -> Response:
    # The hottest route (every donor, every few seconds) skips FastAPI's dependency and body machinery, which
    # cost it 40% of its throughput: the same checks, inline. Documented by hand (openapi_extra) to match.
    state = security.state_of(request)
    node = await security.authenticate_node_header(
        state, security.client_ip(request), request.headers.get("authorization")
    )
    try:
        req = schemas.HeartbeatRequest.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", errors.describe(list(exc.errors()))) from None
    action, cluster = workers.heartbeat(state, node, req)
    return Response(
        b'{"action":"%s","cluster":"%s"}' % (action.encode(), state.cluster_epoch(cluster).encode()),
        media_type="application/json",
    )


@router.get("/ray", response_model=schemas.RayInfo, openapi_extra=security.NODE)
def ray_info(node: NodeDep, session: SessionDep, state: State) -> schemas.RayInfo:
    """The donor's own cluster (the core's head, or its edge's) and its current token, for a live donor (after
    a token rotation)."""
    return workers.ray_info(state, session, node)


@router.get("/me", response_model=schemas.WorkerOut, openapi_extra=security.NODE)
def me(node: NodeDep, session: SessionDep, state: State) -> schemas.WorkerOut:
    """The registry's view of this donor (for `rma status`)."""
    return workers.get(state, session, node.worker_id)


@router.delete("/unregister", status_code=204, openapi_extra=security.NODE)
def unregister(node: NodeDep, session: SessionDep, state: State, ip: ClientIp) -> Response:
    workers.unregister(state, session, node, ip)
    return Response(status_code=204)
