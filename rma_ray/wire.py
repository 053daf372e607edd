"""The donor and keyring wire: one set of pydantic models for both ends. The coordinator
(`admission/schemas.py`) validates requests and shapes replies with them; the agent and the CLI
(`rma_ray/client.py`) send the same request models and parse replies into the same reply models, so no dict
crosses a room boundary untyped.

Reply models ignore fields they do not know (a newer coordinator may add some); request models refuse them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from rma_ray.capabilities import Capabilities, _to_mb
from rma_ray.edges import CORE
from rma_ray.tiers import Tier

Action = Literal["none", "drain", "leave"]
# a donor that stepped aside on purpose: by `rma pause`, outside its `--schedule`, or for its owner's own use
# (`--yield-when-busy`); it keeps heartbeating, and the registry never counts it offline
PAUSED_STATES = ("paused", "off_schedule", "yielding")
PausedState = Literal["paused", "off_schedule", "yielding"]
WorkerStatus = Literal[
    "joining",
    "healthy",
    "warning",
    "offline",
    "quarantined",
    "revoked",
    "left",
    "paused",
    "off_schedule",
    "yielding",
]
HeartbeatStatus = Literal[
    "healthy", "starting", "draining", "degraded", "stopping", "paused", "off_schedule", "yielding"
]


def _has_nul(v: Any) -> bool:
    if isinstance(v, str):
        return "\x00" in v
    if isinstance(v, BaseModel):
        return any(_has_nul(x) for x in v.__dict__.values())
    if isinstance(v, dict):
        return any(_has_nul(k) or _has_nul(x) for k, x in v.items())
    if isinstance(v, list | tuple | set | frozenset):
        return any(_has_nul(x) for x in v)
    return False


class NulFree(BaseModel):
    """No string in it, nested models' included, holds a NUL: PostgreSQL's text cannot store one (a 500
    there, where SQLite took it), and no name, hostname or id of ours has one."""

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        if _has_nul(v):
            raise ValueError("must not contain a NUL character (\\u0000)")
        return v


class Strict(NulFree):
    model_config = ConfigDict(extra="forbid")


class OverlayRequest(Strict):
    public_key: str = Field(
        description="the donor's WireGuard public key (base64, 32 bytes); the private key "
        "never leaves the donor"
    )

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
    """The Ray cluster a donor joins: the core's, or its edge's (an edge donor never sees the core's)."""

    address: str
    auth_token: str | None
    cluster: str = Field(default=CORE, description="'core' or the edge cluster's name")


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
    cluster: str = Field(default=CORE, description="the Ray cluster this donor belongs to")


class RegisterResponse(RejoinResponse):
    node_token: str = Field(description="shown once; only its hash is kept")


class AbortResponse(BaseModel):
    refunded: bool = Field(description="True: the registration never ran, and its invite use was given back")


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: HeartbeatStatus = "healthy"
    current_load: float = Field(default=0.0, ge=0, le=100_000)
    available_memory_mb: int | None = Field(default=None, ge=0, le=64 * 1024 * 1024)
    ray_node_id: str | None = Field(default=None, max_length=64, pattern=r"^[0-9a-fA-F]*$")
    resume_at: AwareDatetime | None = Field(
        default=None,
        description="off_schedule: when the donor's next window starts (it comes back then); within 8 days",
    )

    @field_validator("available_memory_mb", mode="before")
    @classmethod
    def _human(cls, v: Any) -> Any:
        return _to_mb(v)

    @field_validator("resume_at")
    @classmethod
    def _soon(cls, v: datetime | None) -> datetime | None:
        # a weekly schedule's next window is under 8 days away; anything else is a broken clock or a bad client
        if v is not None and abs(v - datetime.now(UTC)) > timedelta(days=8):
            raise ValueError("must be within 8 days of now (the next window of a weekly schedule)")
        return v


class HeartbeatResponse(BaseModel):
    action: Action
    cluster: str = Field(default="", description="fingerprint of the cluster token; changes on rotation")


# a donor's registry record: the admin's list and the donor's own view (GET /api/worker/me)
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
    cluster: str = CORE
    resume_at: datetime | None = Field(default=None, description="off_schedule: its next window's start")


STORE_NAME = r"^[a-z][a-z0-9-]{0,31}$"
StoreStatus = Literal[
    "starting",
    "ready",
    "restarting",
    "failed",
    "stopped",
    "waiting",
    "backing-up",
    "restoring",
    "frozen",
    "awaiting-restore",  # a moved store before its data is restored: it serves nobody yet
]


class StoreReport(NulFree):
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


class Quota(BaseModel):
    """A client key's quotas (None: no limit): requests per minute (any 60 s), LLM tokens (in + out) and
    uploaded bytes per UTC day. In the keyring each key carries its effective quota (the coordinator's
    defaults with the key's overrides on top), so every ingress enforces the same numbers."""

    requests_per_minute: int | None = Field(None, ge=1, le=10**9)
    tokens_per_day: int | None = Field(None, ge=1, le=10**15)
    upload_bytes_per_day: int | None = Field(None, ge=1, le=10**15)


class QuotaPatch(Strict):
    """`rma clients quota`: the fields given replace the key's overrides; `reset` drops them all first (the
    key is back on the defaults)."""

    requests_per_minute: int | None = Field(None, ge=1, le=10**9)
    tokens_per_day: int | None = Field(None, ge=1, le=10**15)
    upload_bytes_per_day: int | None = Field(None, ge=1, le=10**15)
    reset: bool = False


class Usage(BaseModel):
    """One client key's counters for one UTC day, as the gateway counts them (once per request)."""

    requests: int = Field(0, ge=0, le=10**15)
    tokens_in: int = Field(0, ge=0, le=10**15)
    tokens_out: int = Field(0, ge=0, le=10**15)
    upload_bytes: int = Field(0, ge=0, le=10**15)


REPORT_KEYS = 200  # keys per usage report: a day with more keys is sent in several (the body limit is 64 KiB)


class UsageReport(Strict):
    """What a gateway replica reports every ~30 s (a service credential): the day's usage per key id as the
    shared store holds it (absolute counters: a report repeated or sent by several replicas changes
    nothing), and whether the replica's quotas are shared (Redis) or per replica (Redis unreachable)."""

    replica: str = Field(min_length=1, max_length=200)
    day: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    shared: bool
    error: str | None = Field(None, max_length=500)
    usage: dict[str, Usage] = Field(default_factory=dict, max_length=REPORT_KEYS)


class JobQueueFigures(Strict):
    """The document-ingest jobs' queue (deployments/services/ingest.py) in a batches replica's report."""

    queued: int = Field(ge=0, le=10**12, description="jobs waiting for a runner")
    running: int = Field(ge=0, le=10**12, description="jobs a runner is on")
    oldest_queued_s: float | None = Field(
        None, ge=0, le=10**9, description="age of the oldest waiting job; None when none waits"
    )
    succeeded_10min: int = Field(ge=0, le=10**12, description="jobs succeeded in the last 10 minutes")
    failed_10min: int = Field(ge=0, le=10**12, description="jobs failed in the last 10 minutes")
    pages_10min: int = Field(
        ge=0, le=10**12, description="pages of the jobs succeeded in the last 10 minutes"
    )


class BatchQueueReport(Strict):
    """What a batches replica reports after each sweep (a service credential): the durable batch queue's
    figures, read from the services' Postgres (the coordinator cannot read that database)."""

    replica: str = Field(min_length=1, max_length=200)
    waiting: int = Field(ge=0, le=10**12, description="items pending")
    running: int = Field(ge=0, le=10**12, description="items claimed by a runner")
    batches: int = Field(ge=0, le=10**9, description="batches not finished yet")
    oldest_waiting_s: float | None = Field(
        None, ge=0, le=10**9, description="age of the oldest pending item's batch; None when none waits"
    )
    finished_10min: int = Field(ge=0, le=10**12, description="items answered in the last 10 minutes")
    jobs: JobQueueFigures | None = Field(None, description="the ingest jobs' queue (None: an older replica)")


class KeyringEntry(BaseModel):
    id: str
    hash: str
    name: str  # the client the key belongs to: client-scoped routes (client RAG) compare it with the path
    sensitive: bool = False  # its requests never leave the core (no edge cluster serves them)
    quota: Quota = Field(default_factory=Quota)  # the key's effective quota (defaults + overrides)


class KeyringOut(BaseModel):
    generated_at: datetime
    keys: list[KeyringEntry]


Keyring = KeyringOut  # the name the Serve side reads it by


class EdgeRoute(BaseModel):
    """One edge cluster as the core's gateway sees it: where to forward, with which credential, and whether
    the edge can serve an app now (Serve's own status of the edge, read with the edge's token)."""

    name: str
    serve_url: str
    token: str = Field(description="an EdDSA JWT for this edge's ingress; names no client")
    expires_at: datetime
    apps: dict[str, int] = Field(
        default_factory=dict, description="application -> replicas RUNNING (0: the core serves it)"
    )
    healthy: bool = Field(description="the edge's dashboard answered and its Serve reported its apps")


class EdgeRoutes(BaseModel):
    edges: list[EdgeRoute]  # a quarantined edge (failed spot-checks) is left out: the core serves its share
    spot_check_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="fraction of edge answers the core re-checks (RMA_SPOT_CHECK_RATE)"
    )
    quarantined: list[str] = Field(
        default_factory=list,
        description="edges left out for failed spot-checks (the pool has edges: say `core`)",
    )


SpotCheckKind = Literal["llm", "embeddings", "ocr", "parse"]


class SpotCheckReport(Strict):
    """A core gateway's verdict on one sampled edge answer, re-checked on a core replica off the request path
    (POST /api/service/spot-checks, a service credential or a trusted core donor's). The coordinator keeps a
    decayed pass rate per edge and quarantines an edge below its threshold. `sample` is kept for review only
    when the check failed: the request and both answers, truncated (client data: it stays on the core)."""

    edge: str = Field(min_length=1, max_length=64)
    app: str = Field(min_length=1, max_length=64, description="the Serve application the edge answered for")
    kind: SpotCheckKind
    path: str = Field(min_length=1, max_length=200)
    passed: bool
    score: float = Field(description="the comparison's score (cosine, text similarity, mean logprob gap)")
    threshold: float = Field(description="the score a pass needs (the check's own calibrated bound)")
    request_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the request body's digest")
    sample: dict[str, Any] | None = Field(
        None, description="failed checks only: request and both answers, each truncated to 4 KiB"
    )
    upstream: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[0-9A-Za-z.:\[\]]+$",
        description="where the edge's HAProxy forwarded the request (x-rma-upstream: the replica's address "
        "and port, rma_ray.upstream): the coordinator names the donor at that address",
    )


class DonorVersions(BaseModel):
    """What a donor must match (GET /donor/versions.json; `rma version --check`): Ray, the Python minor version
    and the pool's code (its version and the fingerprint of its modules: rma_ray/dists.py)."""

    pool: str = Field(description="the rma-pool version")
    revision: str | None = Field(None, description="fingerprint of the pool's Python modules a donor runs")
    ray: str
    python: str = Field(description="the full Python version, e.g. 3.11.7; donors must match its minor")
    wheel: str | None = Field(
        None, description="the pool's wheel under /donor/ (what the install line installs)"
    )

    @property
    def python_minor(self) -> str:
        return ".".join(self.python.split(".")[:2])
