"""Dependencies as named aliases: SessionDep, State, AdminDep, NodeDep, ServiceDep, ClientIp."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from admission import security
from admission.db import session_scope
from admission.errors import ApiError
from admission.models import Worker
from admission.security import AdminPrincipal, NodePrincipal, ServicePrincipal
from admission.state import AppState
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.edges import CORE

_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="rma_admin_<id>_<secret>")
_join_bearer = HTTPBearer(auto_error=False, scheme_name="JoinToken", description="rma_join_<id>_<secret>")
_node_bearer = HTTPBearer(auto_error=False, scheme_name="NodeToken", description="rma_node_<id>_<secret>")
_any_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminOrNode",
    description="an admin key, a node token or a service credential",
)

Creds = HTTPAuthorizationCredentials | None


async def get_state(request: Request) -> AppState:
    return security.state_of(request)


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(security.state_of(request).sessions) as session:
        yield session


async def get_ip(request: Request) -> str:
    return security.client_ip(request)


State = Annotated[AppState, Depends(get_state)]
# scope="function": commit before the response is sent, so a client that got 200 sees its change next time
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ClientIp = Annotated[str, Depends(get_ip)]


def require_admin(
    state: State, ip: ClientIp, creds: Annotated[Creds, Depends(_admin_bearer)]
) -> AdminPrincipal:
    return security.authenticate_admin(state, ip, creds)


async def require_node(request: Request, creds: Annotated[Creds, Depends(_node_bearer)]) -> NodePrincipal:
    # async: no thread hop; only a cache miss touches the database
    return await security.authenticate_node_async(
        security.state_of(request), security.client_ip(request), creds
    )


async def join_credentials(
    state: State, ip: ClientIp, creds: Annotated[Creds, Depends(_join_bearer)]
) -> credentials.Parsed:
    """Rate limits and the token's shape, before the body is even read; the hash is checked by the service."""
    state.limiter.hit_register(ip)
    state.limiter.check_auth_allowed(ip)
    return security.parse_bearer(state, ip, creds, Kind.JOIN)


Service = AdminPrincipal | NodePrincipal | ServicePrincipal


def require_service(state: State, ip: ClientIp, creds: Annotated[Creds, Depends(_any_bearer)]) -> Service:
    if creds is not None and creds.credentials.startswith("rma_node_"):
        return security.authenticate_node(state, ip, creds)
    if creds is not None and creds.credentials.startswith("rma_service_"):
        return security.authenticate_service(state, ip, creds)
    return security.authenticate_admin(state, ip, creds)


def _core_node_only(state: AppState, who: Service, trusted: bool, refusal: str) -> Service:
    """`who`, unless it is a donor's node credential other than a core donor's that is trusted (`trusted`), or,
    without `trusted`, that is trusted or in a pool without edges; never a quarantined donor's (its node may be
    an impostor's or lie about its hardware: it keeps only its heartbeat, status and leave)."""
    if isinstance(who, NodePrincipal):
        with state.sessions() as session:
            worker = session.get(Worker, who.worker_id)
            quarantine = worker.quarantine_reason if worker is not None else None
            allowed = (
                worker is not None
                and worker.cluster == CORE
                and (bool(worker.trusted) or (not trusted and not state.settings.edges))
            )
        if quarantine:
            raise ApiError(
                403, "quarantined", f"donor {who.worker_id} is quarantined: {quarantine}; ask the pool admin"
            )
        if not allowed:
            raise ApiError(403, "not_trusted_core", refusal)
    return who


def require_core_service(
    state: State, ip: ClientIp, creds: Annotated[Creds, Depends(_any_bearer)]
) -> Service:
    """require_service, and never an edge donor's node credential: what the core shares with its services
    (client-key hashes, edge credentials) stays in the core. Where the pool has edges (untrusted donors join
    them), an untrusted donor of the core is refused too; a pool without edges keeps serving the keyring to the
    untrusted donors that host its ingress replicas, as it always has."""
    return _core_node_only(
        state,
        require_service(state, ip, creds),
        trusted=False,
        refusal="only the head's services and trusted donors of the core cluster may read this; "
        "an untrusted or edge donor gets nothing of the core",
    )


def require_trusted_service(
    state: State, ip: ClientIp, creds: Annotated[Creds, Depends(_any_bearer)]
) -> Service:
    """require_service, and a node credential only of a trusted donor of the core (whether or not the pool has
    edges): for reports only what runs on trusted nodes sends (the batch queue's figures)."""
    return _core_node_only(
        state,
        require_service(state, ip, creds),
        trusted=True,
        refusal="only the head's services and trusted donors of the core cluster may send this",
    )


def require_session(state: State, request: Request) -> AdminPrincipal:
    admin = security.session_admin(state, request)
    if admin is None:
        raise ApiError(401, "login_required", "log in on /registry/login with an admin key")
    return admin


def _calls(dependant: Any) -> set[Any]:
    """Every dependency callable under a route's dependant."""
    out, todo = set(), [dependant] if dependant is not None else []
    while todo:
        d = todo.pop()
        out.add(d.call)
        todo.extend(d.dependencies)
    return out


def credential_first(request: Request) -> None:
    """The check of the credential a route declares (`openapi_extra` x-rma-auth), run by the handler of an
    invalid request before it answers 422: raises the same ApiError the route's dependency would. A join token
    is checked for its shape only, as the join routes do before the body (its hash is checked after)."""
    route = request.scope.get("route")
    level = ((getattr(route, "openapi_extra", None) or {}).get("x-rma-auth")) if route else None
    if level in (None, "public"):
        return
    state, ip = security.state_of(request), security.client_ip(request)
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()) if token.strip() else None
    if level == "admin":
        security.authenticate_admin(state, ip, creds)
    elif level == "node-token":
        security.authenticate_node(state, ip, creds)
    elif level == "admin-or-node":
        calls = _calls(getattr(route, "dependant", None))
        strictest = next(
            (d for d in (require_trusted_service, require_core_service) if d in calls), require_service
        )
        strictest(state, ip, creds)
    elif level == "join-token":
        security.parse_bearer(state, ip, creds, Kind.JOIN)
    elif level == "admin-session":
        require_session(state, request)


AdminDep = Annotated[AdminPrincipal, Depends(require_admin)]
NodeDep = Annotated[NodePrincipal, Depends(require_node)]
ServiceDep = Annotated[Service, Depends(require_service)]
CoreServiceDep = Annotated[Service, Depends(require_core_service)]
TrustedServiceDep = Annotated[Service, Depends(require_trusted_service)]
JoinCreds = Annotated[credentials.Parsed, Depends(join_credentials)]
SessionAdmin = Annotated[AdminPrincipal, Depends(require_session)]
