"""The admin registry page: server-rendered, log-in with an admin key (HttpOnly cookie), refreshes itself by
swapping in a freshly rendered fragment; its Requests section (Serve's request metrics and a 24 h chart drawn by
the vendored uPlot) updates from /registry/metrics. Everything it loads is served from this package (no CDN).
The fragment carries the donors' Contributors leaderboard (admission.services.contributions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates

from admission import schemas, security
from admission.deps import AdminDep, ClientIp, SessionAdmin, SessionDep, State
from admission.errors import ApiError
from admission.services import (
    batch_queue,
    contributions,
    edges,
    metrics,
    reputation,
    stats,
    stores,
    usage,
    workers,
)
from rma_ray.tiers import MINIMUMS, TIER_ORDER

router = APIRouter(tags=["registry"])
templates = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _fmt_age(s: float | None) -> str:
    """An age for people: "40 s", "3 min", "2 h", "1 d"; "–" for none."""
    if s is None:
        return "–"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit}"
    return f"{int(s)} s"


templates.env.filters["mb"] = _fmt_mb
templates.env.filters["age"] = _fmt_age
templates.env.filters["ms"] = _fmt_ms
templates.env.filters["sparkline"] = contributions.sparkline
StepQ = Annotated[
    int,
    Query(
        ge=60,
        le=3600,
        description="the series' bucket in whole minutes that divide a day: "
        "60, 300, 600 (default), 900, 1800 or 3600 seconds",
    ),
]
ClusterQ = Annotated[
    str | None,
    Query(
        max_length=16,
        description="one cluster's figures: core or an edge's name (default: the pool's, every row naming its "
        "cluster)",
    ),
]


def _request_metrics(
    state: State, session: SessionDep, step_s: int, cluster: str | None = None
) -> schemas.RequestMetricsOut:
    if step_s % 60 or 86400 % step_s:
        raise ApiError(
            422,
            "invalid_request",
            f"step_s: {step_s} is not a whole number of minutes that divides a "
            "day; use 60, 300, 600, 900, 1800 or 3600",
        )
    known = state.settings.clusters
    if cluster is not None and cluster not in known:
        raise ApiError(
            422,
            "invalid_request",
            f"cluster: {cluster[:16]!r} is not a cluster of this pool; use one of {', '.join(known)} "
            "(or leave it out for the whole pool)",
        )
    collector = state.reconciler.collector if state.reconciler is not None else None
    return metrics.cached_summary(session, collector, step_s=step_s, cluster=cluster)


@router.get("/api/admin/metrics", response_model=schemas.RequestMetricsOut, openapi_extra=security.ADMIN)
def request_metrics(
    admin: AdminDep, state: State, session: SessionDep, step_s: StepQ = 600, cluster: ClusterQ = None
) -> schemas.RequestMetricsOut:
    """Ray Serve requests: today (UTC) and the last hour (count, 4xx/5xx, p50/p99 from latency buckets), per
    cluster and application, queued now per deployment, and a 24 h series; from the head's scrapes of every
    cluster's Serve metrics. `?cluster=` narrows them to what one cluster's Serve ingress served."""
    return _request_metrics(state, session, step_s, cluster)


@router.get("/registry/metrics", response_model=schemas.RequestMetricsOut, openapi_extra=security.SESSION)
def registry_metrics(
    admin: SessionAdmin, state: State, session: SessionDep, step_s: StepQ = 600, cluster: ClusterQ = None
) -> schemas.RequestMetricsOut:
    """The same figures for the registry page (its session cookie)."""
    return _request_metrics(state, session, step_s, cluster)


@router.get("/registry/login", response_class=HTMLResponse, openapi_extra=security.PUBLIC)
def login_page(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"error": None})


@router.post("/registry/login", openapi_extra=security.PUBLIC)
def login(
    request: Request, state: State, ip: ClientIp, admin_key: Annotated[str, Form(max_length=200)]
) -> Response:
    creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=admin_key.strip())
    try:
        admin = security.authenticate_admin(state, ip, creds)
    except ApiError as exc:
        return templates.TemplateResponse(
            request,
            "login.html",
            {"error": exc.message},
            status_code=exc.status,
            headers=exc.headers if exc.status == 429 else None,
        )
    resp = RedirectResponse("/registry", status_code=303)
    resp.set_cookie(
        security.SESSION_COOKIE,
        security.issue_session(state, admin),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=state.settings.session_ttl_s,
        path="/",
    )
    return resp


@router.post("/registry/logout", openapi_extra=security.PUBLIC)
def logout(request: Request, state: State) -> Response:
    security.end_session(state, request)  # server-side: a copy of the cookie is worth nothing from now on
    resp = RedirectResponse("/registry/login", status_code=303)
    resp.delete_cookie(security.SESSION_COOKIE, path="/")
    return resp


@router.get("/registry", response_class=HTMLResponse, openapi_extra=security.SESSION)
def registry(request: Request, state: State, session: SessionDep, partial: bool = False) -> Response:
    admin = security.session_admin(state, request)
    if admin is None:
        if partial:
            return Response(status_code=401)
        return RedirectResponse("/registry/login", status_code=303)
    ws = workers.list_all(state, session)
    tier_of = {t: [w for w in ws if w.tier == str(t)] for t in TIER_ORDER}
    ctx = {
        "stats": stats.stats(state, session),
        "tiers": [(str(t), t.number, MINIMUMS[t], tier_of[t]) for t in TIER_ORDER],
        "workers": ws,
        "stores": stores.list_all(
            session, state.reconciler.view.pending_stores if state.reconciler else None
        ),
        "ray_dashboard_url": state.settings.ray_dashboard_url,
        "ray_view": state.reconciler.view if state.reconciler is not None else None,
        "clusters": edges.clusters_view(state, ws),
        "usage": usage.summary(session, state.settings),
        "batch_queue": batch_queue.summary(),
        "spot_checks": reputation.overview(session, state.settings, failures=0),
        "admin_id": admin.key_id,
        "partial": partial,
        "contributions": contributions.cached_overview(state, session, hours=24),
    }
    if not partial:  # the Requests section sits outside the refreshed fragment; its script keeps it current
        ctx["requests"] = _request_metrics(state, session, 600)
        ctx["metrics_wired"] = state.reconciler is not None
    return templates.TemplateResponse(
        request,
        "registry_body.html" if partial else "registry.html",
        ctx,
        headers={"Cache-Control": "no-store"},
    )
