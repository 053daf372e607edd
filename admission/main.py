"""The coordinator app: `create_app(settings)`; `admission.main:app` for uvicorn (settings from RMA_*)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from admission import db, errors, migrate, security
from admission.proxy import ClientAddress
from admission.ratelimit import IpLimiter
from admission.routes import admin, contributions, donor, edges, health, invites, registry, worker
from admission.services import keys, overlay
from admission.state import AppState
from rma_ray.bodylimit import BodyLimit, json_refusal
from rma_ray.settings import Settings

log = logging.getLogger("rma.admission")


# Everything the registry page loads is its own (no inline script or style, no CDN), so the CSP can be strict.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_HSTS = (b"strict-transport-security", b"max-age=31536000")


class SecurityHeaders:
    """CSP, no framing, no sniffing, no referrer on every response; HSTS when the request came over HTTPS
    (directly, or through a trusted proxy's X-Forwarded-Proto: see admission.proxy)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = _HEADERS + ([_HSTS] if scope.get("scheme") == "https" else [])

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in have)]
            await send(message)

        await self.app(scope, receive, with_headers)


class NoNul:
    """A NUL (%00) in the path or the query string is refused (400) before any route: PostgreSQL's text
    cannot hold one (a lookup by such an id was a 500 there), and no id, name or filter of ours has one.
    Bodies are checked by their models (rma_ray.wire.NulFree)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = "\x00" in scope.get("path", "") or b"\x00" in scope.get("raw_path", b"")
            query = scope.get("query_string", b"")
            if path or b"%00" in query or b"\x00" in query:
                message = f"the {'path' if path else 'query string'} holds a NUL character (%00); no id or name has one"
                refusal = JSONResponse(errors.body("invalid_request", message), status_code=400)
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def build_state(settings: Settings) -> AppState:
    engine = db.make_engine(settings.resolved_database_url)
    return AppState(
        settings=settings,
        engine=engine,
        sessions=db.make_sessionmaker(engine),
        secret_key=settings.resolved_secret_key(),
        limiter=IpLimiter(settings.register_rate, settings.auth_failure_rate),
    )


def prepare_database(state: AppState) -> str | None:
    """Migrate and bootstrap admin keys; returns a newly minted first admin key (to show once), or None."""
    if state.settings.auto_migrate:
        migrate.upgrade(state.engine)
    given = state.settings.admin_key.get_secret_value() if state.settings.admin_key else None
    with db.session_scope(state.sessions) as session:
        overlay.sync(state, session)  # a restarted head brings its hub up empty: give it the live donors back
        minted = keys.ensure_admin_key(session, given)
        session.flush()
        security.remember_live_keys(state, session)
        return minted


async def _flush_loop(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.heartbeat_flush_s)
        try:
            await run_in_threadpool(state.buffer.flush, state.sessions)
        except Exception:
            log.exception("heartbeat flush failed; will retry")


def create_app(settings: Settings | None = None, state: AppState | None = None) -> FastAPI:
    settings = settings or (state.settings if state else Settings())
    state = state or build_state(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        minted = await run_in_threadpool(prepare_database, state)
        if minted:
            # Started without the CLI and without RMA_ADMIN_KEY: never log the key itself.
            log.warning(
                "no admin key existed; one was created but cannot be shown here. "
                "Use `rma admission serve` (prints it once) or set RMA_ADMIN_KEY."
            )
        flusher = asyncio.create_task(_flush_loop(state))
        if state.settings.ray_dashboard_url or state.settings.edges:
            from admission.services.reconcile import Reconciler

            state.reconciler = Reconciler(state, state.settings.reconcile_interval_s).start()
        try:
            yield
        finally:
            if state.reconciler is not None:
                state.reconciler.stop()
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await run_in_threadpool(state.buffer.flush, state.sessions)

    # No /docs or /redoc (Swagger UI and ReDoc load from a CDN); the schema is GET /api/admin/openapi.json.
    app = FastAPI(
        title="RMA Pool admission coordinator",
        version="0.1.0",
        lifespan=lifespan,
        description="Admission, tiers, credentials and the registry of the RMA compute pool.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.rma = state
    errors.install(app)
    routers = (worker.router, invites.router, admin.router, edges.router, registry.router, health.router)
    for r in routers:  # hottest first
        app.include_router(r)
    app.include_router(contributions.router)
    app.include_router(donor.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).resolve().parent / "static"), name="static")
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, refusal=json_refusal("payload_too_large")
    )
    app.add_middleware(NoNul)
    app.add_middleware(SecurityHeaders)
    # outermost: the rate limits, the audit rows and the Secure cookie all see what it resolves
    app.add_middleware(
        ClientAddress, trusted_proxies=settings.trusted_proxies, client_ip_header=settings.client_ip_header
    )
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn admission.main:app` builds the app from RMA_* only when asked, so importing this module is cheap.
    if name == "app":
        return create_app()
    raise AttributeError(name)
