"""Authentication: admin keys, node tokens, registry sessions. Every check compares hashes in constant time,
is refused (429) before any database work when the client IP is over its failed-auth limit, counts failures per
IP and per credential id (admission.ratelimit) and never logs more than a credential's prefix and id."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt
from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import select
from sqlalchemy.orm import Session

from admission.db import session_scope
from admission.errors import ApiError
from admission.models import AdminKey, AdminSession, ServiceKey, Worker, utcnow
from admission.state import AppState, NodeEntry
from rma_ray import credentials
from rma_ray.credentials import Kind, MalformedToken

# Auth levels, declared on every route (openapi_extra) and checked by the drift-guard test.
PUBLIC = {"x-rma-auth": "public"}
ADMIN = {"x-rma-auth": "admin"}
JOIN = {"x-rma-auth": "join-token"}
NODE = {"x-rma-auth": "node-token"}
SERVICE = {"x-rma-auth": "admin-or-node"}  # or the head's service credential (rma_service_)
SESSION = {"x-rma-auth": "admin-session"}

SESSION_COOKIE = "rma_session"


@dataclass(frozen=True)
class AdminPrincipal:
    key_id: str

    @property
    def actor(self) -> str:
        return f"admin:{self.key_id}"


@dataclass(frozen=True)
class NodePrincipal:
    worker_id: str

    @property
    def actor(self) -> str:
        return f"worker:{self.worker_id}"


@dataclass(frozen=True)
class ServicePrincipal:
    """The head's services (rma_service_): keyring reads and store reports, nothing an admin route accepts."""

    key_id: str

    @property
    def actor(self) -> str:
        return f"service:{self.key_id}"


def state_of(request: Request) -> AppState:
    return request.app.state.rma  # type: ignore[no-any-return]


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def auth_failed(
    state: AppState, ip: str, kind: str, code: str, message: str, credential_id: str | None = None
) -> ApiError:
    state.limiter.record_auth_failure(ip, f"{kind}:{credential_id}" if credential_id else None)
    state.metrics.auth_failures.labels(kind).inc()
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


def parse_bearer(
    state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None, kind: Kind
) -> credentials.Parsed:
    if creds is None or creds.scheme.lower() != "bearer":
        raise auth_failed(
            state,
            ip,
            str(kind),
            "missing_credentials",
            f"send 'Authorization: Bearer rma_{kind}_<id>_<secret>'",
        )
    try:
        return credentials.parse(creds.credentials, kind)
    except MalformedToken as exc:
        raise auth_failed(state, ip, str(kind), "malformed_token", str(exc)) from None


def _key_name(kind: Kind, key_id: str) -> str:
    return f"{kind}:{key_id}"


def _remember_key(state: AppState, parsed: credentials.Parsed, valid_hash: str | None, live: bool) -> None:
    """After the database has decided: a valid key's hash is kept, a revoked or deleted key's dropped (a wrong
    secret for a live key id drops nothing: anyone may know an id, and it must not evict its owner)."""
    if valid_hash is not None:
        state.keys[_key_name(parsed.kind, parsed.id)] = valid_hash
    elif not live:
        state.keys.pop(_key_name(parsed.kind, parsed.id), None)


def remember_live_keys(state: AppState, session: Session) -> None:
    """At start-up: every live admin and service key (a handful), so that the first request of the head's
    services or of the operator after a restart is not refused by a failed-auth budget someone else spent."""
    for model, kind in ((AdminKey, Kind.ADMIN), (ServiceKey, Kind.SERVICE)):
        for key_id, key_hash in session.execute(
            select(model.id, model.key_hash).where(model.revoked_at.is_(None))
        ):
            state.keys[_key_name(kind, key_id)] = key_hash


def _known_key_ok(state: AppState, creds: HTTPAuthorizationCredentials | None, kind: Kind) -> bool:
    """An admin or service key that verifies against the hashes of keys last seen valid (no database work)."""
    if creds is None or creds.scheme.lower() != "bearer":
        return False
    try:
        parsed = credentials.parse(creds.credentials, kind)
    except MalformedToken:
        return False
    stored = state.keys.get(_key_name(kind, parsed.id))
    return stored is not None and credentials.matches(parsed, stored)


def check_key_allowed(
    state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None, kind: Kind
) -> None:
    """The IP's failed-auth limit, before any database work; a valid admin or service key passes anyway: code
    that shares the head's address (an edge donor's tasks) must not be able to lock out the head's own services
    and the operator by failing on purpose. What gets past is checked against the database as usual."""
    try:
        state.limiter.check_auth_allowed(ip)
    except ApiError:
        if not _known_key_ok(state, creds, kind):
            raise


def authenticate_admin(
    state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None
) -> AdminPrincipal:
    check_key_allowed(state, ip, creds, Kind.ADMIN)
    parsed = parse_bearer(state, ip, creds, Kind.ADMIN)
    with state.sessions() as session:
        key = session.get(AdminKey, parsed.id)
        live = key is not None and key.revoked_at is None
        ok = live and key is not None and credentials.matches(parsed, key.key_hash)
    _remember_key(state, parsed, key.key_hash if ok and key is not None else None, live)
    if not ok:
        raise auth_failed(state, ip, "admin", "invalid_admin_key", "unknown or revoked admin key", parsed.id)
    return AdminPrincipal(parsed.id)


def authenticate_service(
    state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None
) -> ServicePrincipal:
    check_key_allowed(state, ip, creds, Kind.SERVICE)
    parsed = parse_bearer(state, ip, creds, Kind.SERVICE)
    with state.sessions() as session:
        key = session.get(ServiceKey, parsed.id)
        live = key is not None and key.revoked_at is None
        ok = live and key is not None and credentials.matches(parsed, key.key_hash)
    _remember_key(state, parsed, key.key_hash if ok and key is not None else None, live)
    if not ok:
        raise auth_failed(
            state, ip, "service", "invalid_service_key", "unknown or revoked service credential"
        )
    return ServicePrincipal(parsed.id)


def load_node(state: AppState, worker_id: str) -> NodeEntry | None:
    with state.nodes_lock:
        entry = state.nodes.get(worker_id)
    if entry is not None:
        return entry
    with state.sessions() as session:
        w = session.get(Worker, worker_id)
        if w is None:
            return None
        entry = NodeEntry(
            w.id,
            w.node_token_hash,
            w.revoked_at is None and w.left_at is None,
            w.action,
            w.cluster,
            bool(w.trusted),
        )
    with state.nodes_lock:
        return state.nodes.setdefault(worker_id, entry)


def _cached_node_ok(state: AppState, creds: HTTPAuthorizationCredentials | None) -> bool:
    """A node token that verifies against the in-memory cache alone (no database work)."""
    if creds is None or creds.scheme.lower() != "bearer":
        return False
    try:
        parsed = credentials.parse(creds.credentials, Kind.NODE)
    except MalformedToken:
        return False
    with state.nodes_lock:
        entry = state.nodes.get(parsed.id)
    return entry is not None and entry.active and credentials.matches(parsed, entry.token_hash)


def check_node_allowed(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None) -> None:
    """The IP's failed-auth limit, before any database work; a donor whose token the cache already vouches for
    passes anyway, so that someone guessing behind the same NAT cannot stop its heartbeats."""
    try:
        state.limiter.check_auth_allowed(ip)
    except ApiError:
        if not _cached_node_ok(state, creds):
            raise


def authenticate_node(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None) -> NodePrincipal:
    check_node_allowed(state, ip, creds)
    parsed = parse_bearer(state, ip, creds, Kind.NODE)
    entry = load_node(state, parsed.id)
    if entry is None or not credentials.matches(parsed, entry.token_hash):
        raise auth_failed(state, ip, "node", "invalid_node_token", "unknown node token", parsed.id)
    if not entry.active:
        raise auth_failed(
            state,
            ip,
            "node",
            "worker_revoked",
            "this worker was revoked or has left the pool; stop the node (rejoin needs a new invite)",
            parsed.id,
        )
    return NodePrincipal(parsed.id)


async def authenticate_node_async(
    state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None
) -> NodePrincipal:
    """authenticate_node without blocking the event loop: only a cache miss touches the database, in a thread."""
    from fastapi.concurrency import run_in_threadpool

    check_node_allowed(state, ip, creds)  # before the cache miss below reaches the database
    if creds is not None and creds.credentials.startswith("rma_node_"):
        worker_id = creds.credentials.split("_")[2]
        if worker_id not in state.nodes:
            await run_in_threadpool(load_node, state, worker_id)
    return authenticate_node(state, ip, creds)


async def authenticate_node_header(state: AppState, ip: str, header: str | None) -> NodePrincipal:
    scheme, _, value = (header or "").partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=value.strip()) if value else None
    return await authenticate_node_async(state, ip, creds)


SESSION_CLAIMS = ["exp", "iat", "sub", "aud", "jti"]


def issue_session(state: AppState, admin: AdminPrincipal) -> str:
    """A signed cookie naming a server-side session row (its jti), so that logging out can end it."""
    now = int(time.time())
    jti = secrets.token_hex(16)
    expires = now + state.settings.session_ttl_s
    with session_scope(state.sessions) as session:
        session.query(AdminSession).filter(
            AdminSession.expires_at < utcnow()
        ).delete()  # keep the table small
        session.add(
            AdminSession(id=jti, key_id=admin.key_id, expires_at=datetime.fromtimestamp(expires, UTC))
        )
    claims = {"sub": admin.key_id, "iat": now, "exp": expires, "aud": "rma-registry", "jti": jti}
    return jwt.encode(claims, state.secret_key, algorithm="HS256")


def _session_claims(state: AppState, token: str, verify_exp: bool = True) -> dict[str, object]:
    return jwt.decode(
        token,
        state.secret_key,
        algorithms=["HS256"],
        audience="rma-registry",
        options={"require": SESSION_CLAIMS, "verify_exp": verify_exp},
    )


def session_admin(state: AppState, request: Request) -> AdminPrincipal | None:
    """The admin behind the registry cookie, or None (expired, forged, logged out, or its key revoked since)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    ip = client_ip(request)
    try:
        # a cookie this coordinator signed (an HMAC, no database work) passes its IP's failed-auth refusal
        claims = _session_claims(state, token)
    except jwt.ExpiredSignatureError:
        state.limiter.check_auth_allowed(ip)
        return None  # an honest browser's old cookie
    except jwt.PyJWTError:
        state.limiter.check_auth_allowed(ip)
        state.limiter.record_auth_failure(ip)
        state.metrics.auth_failures.labels("session").inc()
        return None
    key_id = str(claims["sub"])
    with state.sessions() as session:
        key = session.get(AdminKey, key_id)
        live = session.get(AdminSession, str(claims["jti"]))
        ok = (
            key is not None
            and key.revoked_at is None
            and live is not None
            and live.key_id == key_id
            and live.ended_at is None
        )
    if not ok:
        state.limiter.record_auth_failure(ip, f"session:{claims['jti']}")
        state.metrics.auth_failures.labels("session").inc()
        return None
    return AdminPrincipal(key_id)


def end_session(state: AppState, request: Request) -> None:
    """Logging out: the cookie's session row is ended, so a copy of the cookie is worth nothing from now on."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return
    try:
        claims = _session_claims(state, token, verify_exp=False)
    except jwt.PyJWTError:
        return
    with session_scope(state.sessions) as session:
        live = session.get(AdminSession, str(claims["jti"]))
        if live is not None and live.ended_at is None:
            live.ended_at = utcnow()
