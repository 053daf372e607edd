"""Edge clusters: each edge's public keys (what its ingress verifies the edge credential with), the admin's
rotation of that credential, and the routes the core's gateway forwards by."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.concurrency import run_in_threadpool

from admission import schemas, security
from admission.deps import AdminDep, ClientIp, CoreServiceDep, SessionDep, State, TrustedServiceDep
from admission.services import audit, edges, reputation
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


@router.post("/service/spot-checks", status_code=204, response_class=Response, openapi_extra=security.SERVICE)
def report_spot_check(
    body: schemas.SpotCheckReport, who: TrustedServiceDep, session: SessionDep, state: State, ip: ClientIp
) -> Response:
    """A core gateway's verdict on one sampled edge answer (the head's service credential or a trusted core
    donor's: the checks run on trusted replicas). Updates the edge's pass rate; an edge under the threshold
    is quarantined (left out of the edge routes), audited."""
    reputation.report(session, state.settings, who.actor, body, ip)
    return Response(status_code=204)


@router.get("/admin/spot-checks", response_model=schemas.SpotChecksOut, openapi_extra=security.ADMIN)
def spot_checks(
    admin: AdminDep,
    session: SessionDep,
    state: State,
    failures: Annotated[int, Query(ge=0, le=100, description="recent failures shown per edge")] = 5,
) -> schemas.SpotChecksOut:
    """Per edge: checks, decayed pass rate, quarantine (reason, since), kept failing samples, newest first."""
    return reputation.overview(session, state.settings, failures)


@router.post("/admin/edges/{name}/trust", response_model=schemas.EdgeSpotChecks, openapi_extra=security.ADMIN)
def trust_edge(
    name: EdgeName, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.EdgeSpotChecks:
    """Clear the edge's quarantine and start its pass rate again (after reviewing its failing samples)."""
    return reputation.trust(session, state.settings, admin.actor, name, ip)
