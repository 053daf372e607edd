"""The two unauthenticated routes a host's health check and a Prometheus scraper call. Both cost the same with
10 or 5,000 registered donors: /healthz is `SELECT 1`, /metrics one cached aggregate query."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from admission import security
from admission.deps import State
from admission.services import stats

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    openapi_extra=security.PUBLIC,
    responses={503: {"description": "the database does not answer"}},
)
async def healthz(state: State) -> JSONResponse:
    """Liveness: this process and its database answer. Registry figures are on /api/admin/health."""
    ok = await run_in_threadpool(stats.alive, state)
    return JSONResponse({"status": "ok" if ok else "degraded"}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, openapi_extra=security.PUBLIC)
async def metrics(state: State) -> PlainTextResponse:
    await run_in_threadpool(stats.refresh_gauges, state)
    return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
