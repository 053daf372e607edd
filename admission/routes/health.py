from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from admission import security
from admission.deps import SessionDep, State
from admission.services import stats

router = APIRouter(tags=["health"])


@router.get("/healthz", openapi_extra=security.PUBLIC)
def healthz(state: State, session: SessionDep) -> dict[str, str]:
    """Liveness and database reachability; no registry details (those are on /api/admin/health)."""
    return {"status": stats.health(state, session).status}


@router.get("/metrics", response_class=PlainTextResponse, openapi_extra=security.PUBLIC)
def metrics(state: State, session: SessionDep) -> PlainTextResponse:
    stats.stats(state, session)  # refreshes the workers-by-tier-and-status gauge
    return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
