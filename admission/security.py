"""Authentication: admin keys, node tokens, registry sessions. Every check compares hashes in constant time,
counts failures per IP (429 once over the limit) and never logs more than a credential's prefix and id."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials

from admission.errors import ApiError
from admission.models import AdminKey, ServiceKey, Worker
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


def auth_failed(state: AppState, ip: str, kind: str, code: str, message: str) -> ApiError:
    state.limiter.record_auth_failure(ip)
    state.metrics.auth_failures.labels(kind).inc()
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


def parse_bearer(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None, kind: Kind) -> credentials.Parsed:
    if creds is None or creds.scheme.lower() != "bearer":
        raise auth_failed(state, ip, str(kind), "missing_credentials",
                          f"send 'Authorization: Bearer rma_{kind}_<id>_<secret>'")
    try:
        return credentials.parse(creds.credentials, kind)
    except MalformedToken as exc:
        raise auth_failed(state, ip, str(kind), "malformed_token", str(exc)) from None


def authenticate_admin(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None) -> AdminPrincipal:
    state.limiter.check_auth_allowed(ip)
    parsed = parse_bearer(state, ip, creds, Kind.ADMIN)
    with state.sessions() as session:
        key = session.get(AdminKey, parsed.id)
        ok = key is not None and key.revoked_at is None and credentials.matches(parsed, key.key_hash)
    if not ok:
        raise auth_failed(state, ip, "admin", "invalid_admin_key", "unknown or revoked admin key")
    return AdminPrincipal(parsed.id)


def authenticate_service(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None
                         ) -> ServicePrincipal:
    state.limiter.check_auth_allowed(ip)
    parsed = parse_bearer(state, ip, creds, Kind.SERVICE)
    with state.sessions() as session:
        key = session.get(ServiceKey, parsed.id)
        ok = key is not None and key.revoked_at is None and credentials.matches(parsed, key.key_hash)
    if not ok:
        raise auth_failed(state, ip, "service", "invalid_service_key",
                          "unknown or revoked service credential")
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
        entry = NodeEntry(w.id, w.node_token_hash, w.revoked_at is None and w.left_at is None, w.action)
    with state.nodes_lock:
        return state.nodes.setdefault(worker_id, entry)


def authenticate_node(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None) -> NodePrincipal:
    state.limiter.check_auth_allowed(ip)
    parsed = parse_bearer(state, ip, creds, Kind.NODE)
    entry = load_node(state, parsed.id)
    if entry is None or not credentials.matches(parsed, entry.token_hash):
        raise auth_failed(state, ip, "node", "invalid_node_token", "unknown node token")
    if not entry.active:
        raise auth_failed(state, ip, "node", "worker_revoked",
                          "this worker was revoked or has left the pool; stop the node (rejoin needs a new invite)")
    return NodePrincipal(parsed.id)


async def authenticate_node_async(state: AppState, ip: str, creds: HTTPAuthorizationCredentials | None
                                  ) -> NodePrincipal:
    """authenticate_node without blocking the event loop: only a cache miss touches the database, in a thread."""
    from fastapi.concurrency import run_in_threadpool

    if creds is not None and creds.credentials.startswith("rma_node_"):
        worker_id = creds.credentials.split("_")[2]
        if worker_id not in state.nodes:
            await run_in_threadpool(load_node, state, worker_id)
    return authenticate_node(state, ip, creds)


async def authenticate_node_header(state: AppState, ip: str, header: str | None) -> NodePrincipal:
    scheme, _, value = (header or "").partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=value.strip()) if value else None
    return await authenticate_node_async(state, ip, creds)


def issue_session(state: AppState, admin: AdminPrincipal) -> str:
    now = int(time.time())
    claims = {"sub": admin.key_id, "iat": now, "exp": now + state.settings.session_ttl_s, "aud": "rma-registry"}
    return jwt.encode(claims, state.secret_key, algorithm="HS256")


def session_admin(state: AppState, request: Request) -> AdminPrincipal | None:
    """The admin behind the registry cookie, or None (expired, forged, or its key revoked since)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    try:
        claims = jwt.decode(token, state.secret_key, algorithms=["HS256"], audience="rma-registry")
    except jwt.PyJWTError:
        return None
    with state.sessions() as session:
        key = session.get(AdminKey, str(claims.get("sub", "")))
        if key is None or key.revoked_at is not None:
            return None
    return AdminPrincipal(key.id)
