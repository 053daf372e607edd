"""The gateway's HTTP API (FastAPI), mounted by Serve at /api: `create_api` assembles the services' routers
(`deployments/services/routes/`), the plumbing (`http.py`: the key check with the per-client rate, request
ids, the body limit, the backend caller) and the kit's refusals (`deployments.gateway.refusal`). Every route
needs a client key (a drift test lists them); every refusal is `{"error": {"code", "message", "request_id"}}`;
every response carries X-Request-ID."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI

from deployments.gateway.edge import EdgeForward
from deployments.gateway.refusal import install_refusals
from deployments.services.backends import Backends, as_backend
from deployments.services.edge_app import EDGE_APP, EDGE_ROUTES, bytes_in_body
from deployments.services.http import (
    ApiContext,
    BackendCaller,
    ClientLimiter,
    GatewayMiddleware,
    authenticated,
)
from deployments.services.routes import client_rag, documents, graph, jobs, meta, notes, ocr, rag, uploads
from deployments.services.schemas import (  # the wire models, where openapi.ROUTES names them
    ClientIngestBody,
    ClientQueryBody,
    IngestBody,
    QueryBody,
)
from deployments.services.settings import ServicesSettings

__all__ = [
    "Backends",
    "ClientIngestBody",
    "ClientQueryBody",
    "IngestBody",
    "QueryBody",
    "create_api",
    "create_edge_api",
    "public_routes",
]
ROUTERS = (meta, documents, ocr, uploads, rag, client_rag, notes, graph, jobs)
EDGE_ROUTERS = (documents, ocr)  # what an edge serves: bytes in, text out


def create_api(
    backends: Backends,
    settings: ServicesSettings | None = None,
    *,
    set_request_id: bool = True,
    metrics: Any = None,
    jobs: Any = None,
) -> FastAPI:
    """The FastAPI app. `set_request_id`: add X-Request-ID here (off under Serve, whose proxy adds it to every
    response, its own 503s and 408s included). `jobs`: the ingest jobs' store (default: the rma-batches app's
    `batch_store`, by handle, found at the first /api/jobs call)."""
    s = settings or ServicesSettings()
    # the schema is served by a route of its own (routes/meta.py), behind the key like every other route
    app = FastAPI(
        title="RMA services",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(authenticated)],
    )
    app.state.api = ApiContext(
        backends, s, BackendCaller(s, metrics), ClientLimiter(s.client_rate) if s.client_rate else None
    )
    app.state.published = []
    app.state.jobs = as_backend(jobs)
    install_refusals(app, "pool", catch_all=True)
    # inside the request ids, the body limit and the metrics: OCR and parsing of a file in the body go to an
    # edge cluster's `rma-documents` when one runs it (after the client's key and rate, checked here)
    app.add_middleware(
        EdgeForward,
        app_name=EDGE_APP,
        routes=EDGE_ROUTES,
        max_body_bytes=s.upload_max_bytes + 64 * 1024,
        forwardable=bytes_in_body,
        check=authenticated,
    )
    app.add_middleware(GatewayMiddleware, settings=s, set_request_id=set_request_id, metrics=metrics)
    for module in ROUTERS:
        app.include_router(module.router)
    return app


def create_edge_api(
    backends: Backends, settings: ServicesSettings, *, set_request_id: bool = True
) -> FastAPI:
    """An edge cluster's app (`deployments.services.edge_app`): the OCR and parse routes only, each needing
    the edge credential (the replica runs in edge mode: `authenticated` checks it instead of a client key), a
    file in the body only (no uploads backend: an upload's id is refused)."""
    app = FastAPI(
        title="RMA documents (edge)",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(authenticated)],
    )
    app.state.api = ApiContext(backends, settings, BackendCaller(settings), None)
    app.state.published = []
    install_refusals(app, "pool", catch_all=True)
    app.add_middleware(GatewayMiddleware, settings=settings, set_request_id=set_request_id, metrics=None)
    for module in EDGE_ROUTERS:
        app.include_router(module.router)
    return app


def public_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (for the drift test)."""
    out = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", None) or []):
            out.append((m, getattr(r, "path", "")))
    return out
