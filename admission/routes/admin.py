"""The admin API (the seed's /api/admin/*): workers, stats, health, admin keys, client keys, service
credentials, audit; and the two routes the Serve side calls (keyring, store reports)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from admission import schemas, security
from admission.deps import (
    AdminDep,
    ClientIp,
    CoreServiceDep,
    ServiceDep,
    SessionDep,
    State,
    TrustedServiceDep,
)
from admission.models import AdminKey, ClientKey, ServiceKey
from admission.services import audit, batch_queue, keys, stats, stores, usage, workers

router = APIRouter(prefix="/api", tags=["admin"])

TierQ = Annotated[str | None, Query(pattern="^(gpu|service|data)$")]
ClusterQ = Annotated[str | None, Query(pattern="^[a-z][a-z0-9-]{0,15}$", description="'core' or an edge")]
StatusQ = Annotated[
    str | None,
    Query(
        pattern="^(joining|healthy|warning|offline|quarantined|revoked|left|paused|off_schedule|yielding)$"
    ),
]


@router.get("/admin/openapi.json", include_in_schema=False, openapi_extra=security.ADMIN)
def openapi_schema(admin: AdminDep, request: Request) -> dict[str, object]:
    """The coordinator's OpenAPI schema, for admins only (there is no public /docs: Swagger UI loads from a CDN)."""
    return request.app.openapi()  # type: ignore[no-any-return]


@router.get("/admin/workers", response_model=list[schemas.WorkerOut], openapi_extra=security.ADMIN)
def list_workers(
    admin: AdminDep,
    session: SessionDep,
    state: State,
    tier: TierQ = None,
    status: StatusQ = None,
    cluster: ClusterQ = None,
) -> list[schemas.WorkerOut]:
    return workers.list_all(state, session, tier, status, cluster)


@router.get("/admin/workers/{worker_id}", response_model=schemas.WorkerOut, openapi_extra=security.ADMIN)
def get_worker(worker_id: str, admin: AdminDep, session: SessionDep, state: State) -> schemas.WorkerOut:
    return workers.get(state, session, worker_id)


@router.post(
    "/admin/workers/{worker_id}/revoke", response_model=schemas.WorkerOut, openapi_extra=security.ADMIN
)
def revoke_worker(
    worker_id: str, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.WorkerOut:
    return workers.revoke(state, session, worker_id, admin.actor, ip)


@router.post(
    "/admin/workers/{worker_id}/drain", response_model=schemas.WorkerOut, openapi_extra=security.ADMIN
)
def drain_worker(
    worker_id: str, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.WorkerOut:
    return workers.set_action(state, session, worker_id, "drain", admin.actor, ip)


@router.post(
    "/admin/workers/{worker_id}/resume", response_model=schemas.WorkerOut, openapi_extra=security.ADMIN
)
def resume_worker(
    worker_id: str, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.WorkerOut:
    return workers.set_action(state, session, worker_id, "none", admin.actor, ip)


@router.get("/admin/stats", response_model=schemas.StatsOut, openapi_extra=security.ADMIN)
def get_stats(admin: AdminDep, session: SessionDep, state: State) -> schemas.StatsOut:
    return stats.stats(state, session)


@router.get("/admin/health", response_model=schemas.HealthOut, openapi_extra=security.ADMIN)
def get_health(admin: AdminDep, session: SessionDep, state: State) -> schemas.HealthOut:
    return stats.health(state, session)


@router.get("/admin/ray", response_model=schemas.RayViewOut, openapi_extra=security.ADMIN)
def get_ray(admin: AdminDep, state: State, cluster: ClusterQ = None) -> schemas.RayViewOut:
    """What the reconciler last saw of a Ray cluster (default the core): live nodes, intruders, errors."""
    views = state.reconciler.views if state.reconciler is not None else {}
    view = views.get(cluster or "core")
    if view is None:
        return schemas.RayViewOut(wired=False)
    return schemas.RayViewOut(
        wired=True, at=view.at, error=view.error, nodes_alive=view.nodes_alive, intruders=view.intruders
    )


@router.get("/admin/audit", response_model=list[schemas.AuditOut], openapi_extra=security.ADMIN)
def get_audit(
    admin: AdminDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: Annotated[str | None, Query(max_length=64)] = None,
) -> list[schemas.AuditOut]:
    return [
        schemas.AuditOut.model_validate(e, from_attributes=True) for e in audit.recent(session, limit, action)
    ]


@router.post("/admin/keys", status_code=201, response_model=schemas.KeyCreated, openapi_extra=security.ADMIN)
def create_admin_key(
    req: schemas.NamedCreate, admin: AdminDep, session: SessionDep, ip: ClientIp
) -> schemas.KeyCreated:
    return keys.create(session, AdminKey, req.name, admin.actor, ip)


@router.get("/admin/keys", response_model=list[schemas.KeyOut], openapi_extra=security.ADMIN)
def list_admin_keys(admin: AdminDep, session: SessionDep) -> list[schemas.KeyOut]:
    return keys.list_all(session, AdminKey)


@router.post("/admin/keys/{key_id}/revoke", response_model=schemas.KeyOut, openapi_extra=security.ADMIN)
def revoke_admin_key(key_id: str, admin: AdminDep, session: SessionDep, ip: ClientIp) -> schemas.KeyOut:
    return keys.revoke(session, AdminKey, key_id, admin.actor, ip)


@router.post(
    "/admin/clients", status_code=201, response_model=schemas.KeyCreated, openapi_extra=security.ADMIN
)
def create_client(
    req: schemas.ClientCreate, admin: AdminDep, session: SessionDep, ip: ClientIp
) -> schemas.KeyCreated:
    """A client API key; `sensitive`: its requests stay on the core cluster (never forwarded to an edge);
    `donor_id`: the donor it belongs to (a larger default quota while the donor gives to the pool); `quota`:
    its own quotas from the start."""
    return keys.create(
        session,
        ClientKey,
        req.name,
        admin.actor,
        ip,
        sensitive=req.sensitive,
        donor_id=req.donor_id,
        quota=req.quota,
    )


@router.get("/admin/clients", response_model=list[schemas.KeyOut], openapi_extra=security.ADMIN)
def list_clients(admin: AdminDep, session: SessionDep, state: State) -> list[schemas.KeyOut]:
    return keys.list_all(session, ClientKey, state.settings)


@router.put("/admin/clients/{key_id}/donor", response_model=schemas.KeyOut, openapi_extra=security.ADMIN)
def link_client_donor(
    key_id: str,
    req: schemas.ClientDonorLink,
    admin: AdminDep,
    session: SessionDep,
    state: State,
    ip: ClientIp,
) -> schemas.KeyOut:
    """The donor a client key belongs to (`donor_id` null: none). While that donor gives to the pool (not
    revoked, `client_donor_min_credits_7d` credits in 7 days) the key's default quotas are multiplied by
    `client_donor_quota_factor`; replicas apply it within 10 s."""
    return keys.link_donor(session, key_id, req.donor_id, state.settings, admin.actor, ip)


@router.put("/admin/clients/{key_id}/quota", response_model=schemas.KeyOut, openapi_extra=security.ADMIN)
def set_client_quota(
    key_id: str, req: schemas.QuotaPatch, admin: AdminDep, session: SessionDep, state: State, ip: ClientIp
) -> schemas.KeyOut:
    """A client key's quota overrides (`reset`: back on the defaults); replicas apply them within 10 s."""
    return keys.set_quota(session, key_id, req, state.settings, admin.actor, ip)


@router.get("/admin/usage", response_model=schemas.UsageOut, openapi_extra=security.ADMIN)
def get_usage(
    admin: AdminDep,
    session: SessionDep,
    state: State,
    days: Annotated[int, Query(ge=1, le=90, description="the last N UTC days, today first")] = 1,
) -> schemas.UsageOut:
    """Per client key and day: requests, LLM tokens in/out, uploaded bytes (as the gateway replicas last
    reported them), each key's quota, and whether the replicas' quotas are shared or per replica."""
    return usage.summary(session, state.settings, days)


@router.post("/admin/clients/{key_id}/revoke", response_model=schemas.KeyOut, openapi_extra=security.ADMIN)
def revoke_client(key_id: str, admin: AdminDep, session: SessionDep, ip: ClientIp) -> schemas.KeyOut:
    return keys.revoke(session, ClientKey, key_id, admin.actor, ip)


@router.post(
    "/admin/service-keys", status_code=201, response_model=schemas.KeyCreated, openapi_extra=security.ADMIN
)
def create_service_key(
    req: schemas.NamedCreate, admin: AdminDep, session: SessionDep, ip: ClientIp
) -> schemas.KeyCreated:
    """A credential for the head's services (`rma up` mints one per start): keyring and store reports only."""
    return keys.create(session, ServiceKey, req.name, admin.actor, ip)


@router.get("/admin/service-keys", response_model=list[schemas.KeyOut], openapi_extra=security.ADMIN)
def list_service_keys(admin: AdminDep, session: SessionDep) -> list[schemas.KeyOut]:
    return keys.list_all(session, ServiceKey)


@router.post(
    "/admin/service-keys/{key_id}/revoke", response_model=schemas.KeyOut, openapi_extra=security.ADMIN
)
def revoke_service_key(key_id: str, admin: AdminDep, session: SessionDep, ip: ClientIp) -> schemas.KeyOut:
    return keys.revoke(session, ServiceKey, key_id, admin.actor, ip)


@router.get("/clients/keyring", response_model=schemas.KeyringOut, openapi_extra=security.SERVICE)
def client_keyring(who: CoreServiceDep, session: SessionDep, state: State) -> schemas.KeyringOut:
    """Ids and hashes of live client keys, for the Serve-side verifier (no secrets); never for an edge donor's
    node credential, nor, where the pool has edges, an untrusted donor's (403)."""
    return keys.keyring(session, state.settings)


@router.post("/clients/usage", status_code=204, response_class=Response, openapi_extra=security.SERVICE)
def report_usage(
    body: schemas.UsageReport, who: CoreServiceDep, session: SessionDep, state: State
) -> Response:
    """A gateway replica's report: the day's usage per client key (absolute, from the pool's Redis) and its
    quota state."""
    usage.report(session, body, state.settings)
    return Response(status_code=204)


@router.post("/service/batch-queue", status_code=204, response_class=Response, openapi_extra=security.SERVICE)
def report_batch_queue(body: schemas.BatchQueueReport, who: TrustedServiceDep) -> Response:
    """A batches replica's figures of the durable batch queue (after each sweep, ~10 s): the head's service
    credential or a trusted core donor's (the batches store runs on trusted nodes only); 429 when
    `batch_queue.MAX_REPLICAS` other replicas reported in the last 5 minutes."""
    batch_queue.report(body)
    return Response(status_code=204)


@router.get("/admin/batch-queue", response_model=schemas.BatchQueueOut, openapi_extra=security.ADMIN)
def get_batch_queue(admin: AdminDep) -> schemas.BatchQueueOut:
    """The batch queue as each batches replica last reported it (reports older than 5 minutes dropped):
    items waiting and running, unfinished batches, the oldest waiting item's age, items finished lately."""
    return batch_queue.summary()


@router.put("/stores/{name}", status_code=204, response_class=Response, openapi_extra=security.SERVICE)
def report_store(
    name: Annotated[str, Path(pattern=schemas.STORE_NAME)],
    body: schemas.StoreReport,
    who: ServiceDep,
    session: SessionDep,
) -> Response:
    """A store supervisor's report (a trusted data donor's node credential, or the head's service credential),
    bound to the reporter that created the row."""
    stores.report(session, who, name, body)
    return Response(status_code=204)


@router.get("/admin/stores", response_model=list[schemas.StoreOut], openapi_extra=security.ADMIN)
def list_stores(admin: AdminDep, session: SessionDep, state: State) -> list[schemas.StoreOut]:
    """Stores with name, runtime, node, status and size; `unknown` when the supervisor stopped reporting,
    `pending` when Ray has no node its selector matches (a trusted data donor is needed)."""
    view = state.reconciler.view if state.reconciler is not None else None
    return stores.list_all(session, view.pending_stores if view else None)
