"""Wire shapes of the coordinator's API (the donor and keyring ones come from `rma_ray.wire`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rma_ray.edges import EDGE_NAME
from rma_ray.tiers import Tier

# the donor and keyring wire is shared with the agent and the CLI (rma_ray/wire.py); re-exported here so that
# routes and services find every wire shape of the coordinator in this one module
from rma_ray.wire import (
    STORE_NAME as STORE_NAME,
)
from rma_ray.wire import (
    AbortResponse as AbortResponse,
)
from rma_ray.wire import (
    Action as Action,
)
from rma_ray.wire import (
    BatchQueueReport as BatchQueueReport,
)
from rma_ray.wire import (
    EdgeRoute as EdgeRoute,
)
from rma_ray.wire import (
    EdgeRoutes as EdgeRoutes,
)
from rma_ray.wire import (
    HeartbeatRequest as HeartbeatRequest,
)
from rma_ray.wire import (
    HeartbeatResponse as HeartbeatResponse,
)
from rma_ray.wire import (
    KeyringEntry as KeyringEntry,
)
from rma_ray.wire import (
    KeyringOut as KeyringOut,
)
from rma_ray.wire import (
    OverlayInfo as OverlayInfo,
)
from rma_ray.wire import (
    OverlayRequest as OverlayRequest,
)
from rma_ray.wire import (
    Quota as Quota,
)
from rma_ray.wire import (
    QuotaPatch as QuotaPatch,
)
from rma_ray.wire import (
    RayInfo as RayInfo,
)
from rma_ray.wire import (
    RegisterRequest as RegisterRequest,
)
from rma_ray.wire import (
    RegisterResponse as RegisterResponse,
)
from rma_ray.wire import (
    RejoinRequest as RejoinRequest,
)
from rma_ray.wire import (
    RejoinResponse as RejoinResponse,
)
from rma_ray.wire import (
    SpotCheckReport as SpotCheckReport,
)
from rma_ray.wire import (
    StoreReport as StoreReport,
)
from rma_ray.wire import (
    StoreStatus as StoreStatus,
)
from rma_ray.wire import (
    Strict as Strict,
)
from rma_ray.wire import (
    Usage as Usage,
)
from rma_ray.wire import (
    UsageReport as UsageReport,
)
from rma_ray.wire import (
    WorkerOut as WorkerOut,
)
from rma_ray.wire import (
    WorkerStatus as WorkerStatus,
)


class InviteCreate(Strict):
    ttl_s: int | None = Field(default=None, ge=10, description="lifetime in seconds (default 15 min)")
    uses: int = Field(default=1, ge=1, le=10_000)
    trusted: bool = False
    tier: Tier | None = Field(
        default=None, description="pin the donor to this tier if its hardware qualifies"
    )
    note: str = Field(default="", max_length=500)
    edge: str | None = Field(
        default=None,
        pattern=EDGE_NAME,
        description="the edge cluster an untrusted donor joins (default: the first edge); "
        "not for trusted invites",
    )


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
    edge: str | None = None


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


class QuotaGiven(Quota):
    """A key's own quotas as an admin gives them (unknown fields refused)."""

    model_config = ConfigDict(extra="forbid")


class ClientCreate(NamedCreate):
    sensitive: bool = Field(
        default=False, description="never forward this client's requests to an edge cluster"
    )
    donor_id: str | None = Field(
        default=None,
        max_length=12,
        description="the donor this client belongs to: its key gets a larger default quota while the donor gives",
    )
    quota: QuotaGiven | None = Field(
        default=None,
        description="the key's own quotas from its first request (unset fields: the defaults); the same as "
        "`PUT /api/admin/clients/{id}/quota` afterwards, without the window in which the key runs on the defaults",
    )


class ClientDonorLink(Strict):
    donor_id: str | None = Field(max_length=12, description="the donor to link the key to; null unlinks it")


class KeyCreated(BaseModel):
    id: str
    name: str
    key: str = Field(description="shown once; only its hash is kept")
    created_at: datetime
    sensitive: bool | None = None  # client keys only
    donor_id: str | None = None  # client keys only: the donor it is linked to


class KeyOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    sensitive: bool | None = None  # client keys only
    quota: Quota | None = None  # client keys only: the effective quota (defaults + this key's overrides)
    quota_overrides: Quota | None = None  # client keys only: what `rma clients quota` set (None: defaults)
    donor_id: str | None = None  # client keys only: the donor it is linked to
    donor_bonus: bool | None = None  # client keys only: its defaults are multiplied (the donor gives)


class ClientUsageRow(BaseModel):
    """One client key's usage on one UTC day, with its quota and (for today) what is left of it."""

    key_id: str
    name: str
    day: str
    requests: int
    tokens_in: int
    tokens_out: int
    upload_bytes: int
    quota: Quota
    updated_at: datetime


class QuotaReplica(BaseModel):
    """A gateway replica's quota state, as it last reported: shared (Redis) or per replica (fail-open)."""

    replica: str
    shared: bool
    error: str | None
    reported_at: datetime


class UsageOut(BaseModel):
    days: list[str]
    clients: list[ClientUsageRow]
    shared: bool = Field(description="every replica that reported lately counts in the shared store")
    replicas: list[QuotaReplica]


class BatchQueueReplica(BatchQueueReport):
    """A batches replica's queue figures as it last reported them."""

    model_config = ConfigDict(extra="ignore")

    reported_at: datetime
    per_minute: float = Field(description="items answered per minute over the last 10 minutes")


class BatchQueueOut(BaseModel):
    replicas: list[BatchQueueReplica] = Field(description="fresh reports (5 min), by replica name")


class EdgeKeyOut(BaseModel):
    """An edge credential's signing keys after a rotation (public key ids only)."""

    edge: str
    current_kid: str
    previous_kid: str | None
    rotated_at: datetime
    previous_valid_until: datetime | None


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
    cluster: str  # whose Serve ingress recorded them: "core" or an edge's name
    application: str  # "" for requests no application's route matched (Serve's own 404)


class DeploymentQueue(BaseModel):
    cluster: str
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
    unreachable: list[str] = Field(default_factory=list)  # of the `targets`: "[cluster: ]host:port: why"
    # "cluster: why" of the clusters whose endpoints could not be listed (not among `targets`)
    unlisted: list[str] = Field(default_factory=list)
    clusters: list[str] = Field(default_factory=list)  # the clusters the last pass read ("core", edges)


class RequestMetricsOut(BaseModel):
    """GET /api/admin/metrics: what the seed's dashboard showed beside the workers. "today" is the UTC day.
    Of the pool, or of one cluster's Serve ingress (`cluster`, from `?cluster=`). For the pool, today, last_hour
    and series are the clients' requests (the core's ingress, where every client's request enters: a request the
    gateway forwards to an edge is in the edge's figures too, not added twice), applications and queues are every
    cluster's, each row naming its cluster."""

    generated_at: datetime
    cluster: str | None = None
    day_start: datetime
    today: RequestFigures
    last_hour: RequestFigures
    applications: list[ApplicationRequests]
    queued_total: float
    queues: list[DeploymentQueue]
    series: RequestSeries
    collector: CollectorOut


# the contribution ledger (admission/services/contributions.py); a donor's own view is the wire of
# rma_ray/contribution.py, which `rma status` parses
from rma_ray.contribution import (  # noqa: E402
    ContributionFigures as ContributionFigures,
)
from rma_ray.contribution import (  # noqa: E402
    CreditWeights as CreditWeights,
)
from rma_ray.contribution import (  # noqa: E402
    WorkerContribution as WorkerContribution,
)


class ContributionSeries(BaseModel):
    step_s: int = Field(description="each slot's length (an hour)")
    t: list[int] = Field(description="each slot's start, Unix seconds")
    cpu_s: list[float]
    requests: list[int]
    tokens: list[int]
    credits: list[float]


class DonorContribution(BaseModel):
    worker_id: str
    name: str
    tier: str
    cluster: str
    today: ContributionFigures
    last_7d: ContributionFigures
    all_time: ContributionFigures
    series: ContributionSeries


class ContributionsOut(BaseModel):
    """GET /api/admin/contributions: every donor, best first by credits all time. "today" is the UTC day."""

    generated_at: datetime
    day_start: datetime
    weights: CreditWeights
    donors: list[DonorContribution]


class SpotCheckFailure(BaseModel):
    """A failed spot-check kept for review: what was checked, how it scored, and the sample the gateway sent
    (the request and both answers, truncated; client data that stays on the core)."""

    id: int
    at: datetime
    app: str
    kind: str
    path: str
    score: float
    threshold: float
    request_sha256: str
    reporter: str = Field(description="the credential that reported it (service:<id> or worker:<id>)")
    sample: dict[str, Any] | None
    upstream: str | None = Field(None, description="where the edge head's HAProxy sent the request")
    donor: str | None = Field(None, description="the edge donor at that address (None: not attributable)")


class DonorSpotChecks(BaseModel):
    """One edge donor's own record, over the checks attributed to it (its replica's address)."""

    id: str
    name: str | None = Field(None, description="the donor's name, if still registered")
    checks: int
    failures: int
    pass_rate: float | None
    quarantined: bool = Field(description="drained by the spot-checks: its edge serves on without it")
    last_check_at: datetime | None = None


class EdgeSpotChecks(BaseModel):
    edge: str
    checks: int = Field(description="checks since the edge was last trusted by an admin (or ever)")
    failures: int = Field(description="failed checks among them")
    pass_rate: float | None = Field(description="the decayed pass rate; None before the first check")
    quarantined: bool = Field(description="left out of the edge routes: the core serves its share")
    reason: str | None = None
    since: datetime | None = Field(None, description="when it was quarantined")
    last_check_at: datetime | None = None
    samples_kept: int = Field(description="failing samples kept for review (bounded per edge)")
    recent_failures: list[SpotCheckFailure] = Field(default_factory=list, description="newest first")
    donors: list[DonorSpotChecks] = Field(
        default_factory=list, description="per donor, from the checks attributed to it (fewest passes first)"
    )
    unattributed: int = Field(0, description="checks since the last reset that named no known donor")


class SpotChecksOut(BaseModel):
    rate: float = Field(description="fraction of edge answers the core re-checks")
    min_checks: int = Field(description="checks before any verdict on an edge")
    quarantine_below: float
    half_life_checks: float = Field(description="checks after which a verdict counts half")
    edges: list[EdgeSpotChecks]
