"""Wire shapes of the coordinator's API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rma_ray.capabilities import Capabilities, _to_mb
from rma_ray.tiers import Tier

WorkerStatus = Literal["joining", "healthy", "warning", "offline", "quarantined", "revoked", "left"]
Action = Literal["none", "drain", "leave"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InviteCreate(Strict):
    ttl_s: int | None = Field(default=None, ge=10, description="lifetime in seconds (default 15 min)")
    uses: int = Field(default=1, ge=1, le=10_000)
    trusted: bool = False
    tier: Tier | None = Field(default=None, description="pin the donor to this tier if its hardware qualifies")
    note: str = Field(default="", max_length=500)


class InviteCreated(BaseModel):
    id: str
    token: str = Field(description="shown once; only its hash is kept")
    expires_at: datetime
    uses: int


class InviteOut(BaseModel):
    id: str
    created_at: datetime
    expires_at: datetime
    uses: int
    uses_left: int
    trusted: bool
    tier: str | None
    note: str
    status: Literal["active", "expired", "used", "revoked"]


class OverlayRequest(Strict):
    public_key: str = Field(description="the donor's WireGuard public key (base64, 32 bytes); the private key "
                                        "never leaves the donor")

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        from rma_ray.overlay import is_key

        if not is_key(v):
            raise ValueError("not a WireGuard public key (base64 of 32 bytes, as `wg pubkey` prints)")
        return v


class OverlayInfo(BaseModel):
    address: str = Field(description="this donor's overlay address; Ray advertises it")
    prefix: int
    hub_address: str
    hub_public_key: str
    hub_endpoint: str = Field(description="host:port (UDP) the donor dials")
    keepalive_s: int
    mtu: int


class RegisterRequest(Strict):
    name: str = Field(min_length=1, max_length=255)
    capabilities: Capabilities
    overlay: OverlayRequest | None = Field(default=None, description="required when the pool runs an overlay")


class RayInfo(BaseModel):
    address: str
    auth_token: str | None


class RejoinRequest(RegisterRequest):
    """A known donor coming back (its machine or agent restarted): the same shape as a registration, sent with
    its node token instead of a join token."""


class RejoinResponse(BaseModel):
    worker_id: str
    tier: Tier
    tier_number: int
    trusted: bool
    labels: dict[str, str]
    heartbeat_interval_s: int
    ray: RayInfo | None
    overlay: OverlayInfo | None = None


class RegisterResponse(RejoinResponse):
    node_token: str = Field(description="shown once; only its hash is kept")


class AbortResponse(BaseModel):
    refunded: bool = Field(description="True: the registration never ran, and its invite use was given back")


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["healthy", "starting", "draining", "degraded", "stopping"] = "healthy"
    current_load: float = Field(default=0.0, ge=0, le=100_000)
    available_memory_mb: int | None = Field(default=None, ge=0, le=64 * 1024 * 1024)
    ray_node_id: str | None = Field(default=None, max_length=64, pattern=r"^[0-9a-fA-F]*$")

    @field_validator("available_memory_mb", mode="before")
    @classmethod
    def _human(cls, v: Any) -> Any:
        return _to_mb(v)


class HeartbeatResponse(BaseModel):
    action: Action
    cluster: str = Field(default="", description="fingerprint of the cluster token; changes on rotation")


class WorkerOut(BaseModel):
    id: str
    name: str
    tier: str
    trusted: bool
    status: WorkerStatus
    labels: dict[str, str]
    capabilities: dict[str, Any]
    created_at: datetime
    last_seen_at: datetime | None
    current_load: float | None
    available_memory_mb: int | None
    ray_node_id: str | None
    ray_alive: bool | None
    action: Action
    quarantine_reason: str | None
    revoked_at: datetime | None
    overlay_ip: str | None = None


class TierStats(BaseModel):
    workers: dict[str, int]
    online: int
    capacity: dict[str, float]
    demand: int


class StatsOut(BaseModel):
    tiers: dict[str, TierStats]
    total_workers: int
    online_workers: int
    invites_active: int
    clients_active: int
    generated_at: datetime


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    ray_configured: bool
    workers_online: int
    workers_total: int


class NamedCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .@:/-]+$")


class KeyCreated(BaseModel):
    id: str
    name: str
    key: str = Field(description="shown once; only its hash is kept")
    created_at: datetime


class KeyOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


class KeyringEntry(BaseModel):
    id: str
    hash: str
    name: str  # the client the key belongs to: client-scoped routes (client RAG) compare it with the path


class KeyringOut(BaseModel):
    generated_at: datetime
    keys: list[KeyringEntry]


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    ip: str
    detail: dict[str, Any]


class RayViewOut(BaseModel):
    wired: bool
    at: datetime | None = None
    error: str | None = None
    nodes_alive: int = 0
    intruders: list[dict[str, Any]] = Field(default_factory=list)


STORE_NAME = r"^[a-z][a-z0-9-]{0,31}$"
StoreStatus = Literal["starting", "ready", "restarting", "failed", "stopped"]


class StoreReport(BaseModel):
    """What a store supervisor reports about its store (PUT /api/stores/{name}); never credentials."""
    model_config = ConfigDict(extra="forbid")

    runtime: Literal["process", "docker"]
    status: StoreStatus
    error: str | None = Field(None, max_length=2000)
    node_id: str = Field(min_length=1, max_length=64)
    node_ip: str = Field(min_length=1, max_length=64)
    port: int = Field(ge=1, le=65535)
    size_bytes: int = Field(ge=0)
    restarts: int = Field(0, ge=0)
    ready_s: float | None = Field(None, ge=0)


class StoreOut(BaseModel):
    name: str
    runtime: str
    status: str  # the reported status, or "unknown" when the supervisor has gone quiet
    reported_status: str
    error: str | None
    node: str  # the donor's worker id, or "head"
    worker_name: str | None
    node_id: str
    node_ip: str
    port: int
    size_bytes: int
    restarts: int
    ready_s: float | None
    reported_at: datetime
    seconds_since_report: float


class RequestFigures(BaseModel):
    """Ray Serve HTTP requests over a span; percentiles estimated from Serve's latency histogram buckets."""
    requests: int
    errors_4xx: int
    errors_5xx: int
    p50_ms: float | None
    p99_ms: float | None


class ApplicationRequests(RequestFigures):
    application: str  # "" for requests no application's route matched (Serve's own 404)


class DeploymentQueue(BaseModel):
    application: str
    deployment: str
    queued: float  # waiting for a replica, summed over the handles that call the deployment
    ongoing: float  # submitted to a replica and not yet answered
    at: datetime


class RequestSeries(BaseModel):
    """Columns for the chart: bucket starts (epoch seconds) and one value per bucket."""
    step_s: int
    t: list[int]
    requests: list[int]
    errors: list[int]
    p50_ms: list[float | None]
    p99_ms: list[float | None]


class CollectorOut(BaseModel):
    running: bool
    interval_s: float | None = None
    at: datetime | None = None
    error: str | None = None
    targets: int = 0  # Ray's metrics endpoints (every node's, the autoscaler's, the dashboard's)
    unreachable: list[str] = Field(default_factory=list)


class RequestMetricsOut(BaseModel):
    """GET /api/admin/metrics: what the seed's dashboard showed beside the workers. "today" is the UTC day."""
    generated_at: datetime
    day_start: datetime
    today: RequestFigures
    last_hour: RequestFigures
    applications: list[ApplicationRequests]
    queued_total: float
    queues: list[DeploymentQueue]
    series: RequestSeries
    collector: CollectorOut
