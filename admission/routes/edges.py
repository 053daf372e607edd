"""Edge clusters: each edge's public keys (what its ingress verifies the edge credential with), the admin's
rotation of that credential, and the routes the core's gateway forwards by."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.concurrency import run_in_threadpool

from admission import schemas, security
from admission.deps import AdminDep, ClientIp, CoreServiceDep, SessionDep, State
from admission.services import audit, edges
from rma_ray.edges import EDGE_NAME

router = APIRouter(prefix="/api", tags=["edges"])

EdgeName = Annotated[str, Path(pattern=EDGE_NAME, description="the edge cluster's name")]


@router.get("/edges/{name}/jwks.json", openapi_extra=security.PUBLIC)
def edge_jwks(name: EdgeName, state: State) -> dict[str, Any]:
    """The edge's public signing keys (a JWK set): public by nature, they let the edge's ingress check the
    credential the core's gateway sends."""
    return edges.jwks(state.settings, name)


@router.post(
    "/admin/edges/{name}/rotate-credential", response_model=schemas.EdgeKeyOut, openapi_extra=security.ADMIN
)
def rotate_edge_credential(
    name: EdgeName, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.EdgeKeyOut:
    """A new signing key for the edge's credential; the old key verifies for one more token lifetime."""
    out = edges.rotate(state.settings, name)
    audit.record(session, admin.actor, "edge.credential.rotate", name, ip, kid=out.current_kid)
    return out


@router.post("/service/edge-routes", response_model=schemas.EdgeRoutes, openapi_extra=security.SERVICE)
async def edge_routes(who: CoreServiceDep, state: State) -> schemas.EdgeRoutes:
    """Every edge with a fresh credential and its Serve status, for the core's gateway (the head's service
    credential, or a trusted core donor's node credential; never an edge donor's or an untrusted one's)."""
    return await run_in_threadpool(edges.routes, state)
