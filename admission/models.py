"""Persistence: the registry's tables. Secrets appear here only as SHA-256 hashes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class _Key:
    """An API credential: its id, a name for people, the SHA-256 of its secret, and when it died."""

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AdminKey(_Key, Base):
    __tablename__ = "admin_keys"


class AdminSession(Base):
    """A registry log-in: the session cookie's `jti`. Logging out (or revoking the key) ends it server-side."""

    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(
        String(12), ForeignKey("admin_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Invite(Base):
    __tablename__ = "invites"

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    uses: Mapped[int] = mapped_column(Integer)
    uses_left: Mapped[int] = mapped_column(Integer)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    tier: Mapped[str | None] = mapped_column(String(16), nullable=True)
    note: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the edge cluster an untrusted donor joins (None: the coordinator's first edge, or the core without edges)
    edge: Mapped[str | None] = mapped_column(String(16), nullable=True)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    invite_id: Mapped[str | None] = mapped_column(ForeignKey("invites.id"), nullable=True)
    tier: Mapped[str] = mapped_column(String(16), index=True)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    node_token_hash: Mapped[str] = mapped_column(String(64))
    registered_ip: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_status: Mapped[str] = mapped_column(String(32), default="")
    # an off-schedule donor's next window (from its heartbeat), shown in the registry
    resume_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    current_load: Mapped[float | None] = mapped_column(Float, nullable=True)
    available_memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ray_node_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ray_alive: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ray_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    action: Mapped[str] = mapped_column(String(16), default="none")  # none | drain | leave
    quarantine_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    left_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the WireGuard overlay: the address is released when the donor leaves or is revoked; the public key is
    # kept for ever, so that a key once used (a revoked donor's above all) can never join again
    overlay_ip: Mapped[str | None] = mapped_column(String(45), nullable=True, unique=True)
    wg_public_key: Mapped[str | None] = mapped_column(String(44), nullable=True, unique=True)
    # the Ray cluster it belongs to: "core" or an edge's name (rma_ray.edges); fixed at registration
    cluster: Mapped[str] = mapped_column(String(16), default="core", server_default="core", index=True)


class ClientKey(_Key, Base):
    __tablename__ = "client_keys"

    # a sensitive client's requests are served on the core only, never forwarded to an edge
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # quota overrides (None: the coordinator's default, rma_ray.settings `client_*`); `rma clients quota`
    quota_requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    quota_tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    quota_upload_bytes_per_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # the donor this client belongs to (`rma clients create NAME --donor ID`): its key gets a larger default
    # quota while the donor gives to the pool (admission.services.keys.donor_bonus)
    donor_id: Mapped[str | None] = mapped_column(
        String(12), ForeignKey("workers.id", ondelete="SET NULL"), nullable=True, index=True
    )


class ClientUsage(Base):
    """A client key's counters for one UTC day, as the gateway replicas report them from the pool's Redis
    (absolute values: the highest reported wins, so repeated or concurrent reports change nothing)."""

    __tablename__ = "client_usage"

    key_id: Mapped[str] = mapped_column(String(12), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD (UTC)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ServiceKey(_Key, Base):
    """The head's services (Serve replicas, store supervisors): keyring reads and store reports only."""

    __tablename__ = "service_keys"


class Store(Base):
    """A data store as its Ray supervisor last reported it (the coordinator never imports the supervisors)."""

    __tablename__ = "stores"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    runtime: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(12), nullable=True)  # None: on the head
    node_id: Mapped[str] = mapped_column(String(64))
    node_ip: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # a volume passes 2 GiB
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    ready_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TierDemand(Base):
    """Replicas waiting for a node of a tier in a cluster; written by the reconciler, read by the tier choice."""

    __tablename__ = "tier_demand"

    cluster: Mapped[str] = mapped_column(String(16), primary_key=True, default="core", server_default="core")
    tier: Mapped[str] = mapped_column(String(16), primary_key=True)
    pending: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(64), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RequestMinute(Base):
    """Ray Serve's HTTP requests in one minute, per cluster (the core or an edge: whose Serve ingress recorded
    them), application, route and status code: Serve's ingress request counter and latency histogram, as deltas
    (written by admission.services.metrics). Bucket deltas are kept cumulative by upper bound
    ({"10.0": n, ..., "+Inf": n}) so that percentiles over any span can be estimated."""

    __tablename__ = "request_minutes"

    minute: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    cluster: Mapped[str] = mapped_column(String(16), primary_key=True, default="core", server_default="core")
    application: Mapped[str] = mapped_column(String(128), primary_key=True)
    route: Mapped[str] = mapped_column(String(255), primary_key=True)
    status_code: Mapped[str] = mapped_column(String(8), primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    latency_count: Mapped[int] = mapped_column(Integer, default=0)
    latency_sum_ms: Mapped[float] = mapped_column(Float, default=0.0)
    latency_buckets: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)


class DeploymentLoad(Base):
    """Requests queued (waiting for a replica) and ongoing at replicas, per cluster and Serve deployment (an edge
    runs apps of the same names as the core's), as last scraped."""

    __tablename__ = "deployment_load"

    cluster: Mapped[str] = mapped_column(String(16), primary_key=True, default="core", server_default="core")
    application: Mapped[str] = mapped_column(String(128), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(128), primary_key=True)
    queued: Mapped[float] = mapped_column(Float, default=0.0)
    ongoing: Mapped[float] = mapped_column(Float, default=0.0)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class MetricCursor(Base):
    """The last cumulative value the collector saw of one scraped series (keyed by a hash of its target,
    name and labels), kept in the same transaction as the rollups so a restarted coordinator counts each
    request once."""

    __tablename__ = "metric_cursors"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(255))
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ContributionMinute(Base):
    """What one donor's node gave the pool in one minute (rolled into one row per hour after 48 h, the row at
    the hour's first minute): CPU- and GPU-seconds of Ray's processes there, requests its replicas served and
    LLM tokens generated there, from the head's scrapes (written by admission.services.contributions)."""

    __tablename__ = "contribution_minutes"

    minute: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    worker_id: Mapped[str] = mapped_column(
        String(12), ForeignKey("workers.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    cpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class SpotCheck(Base):
    """One core gateway's verdict on one sampled edge answer (admission.services.reputation). Passes are
    pruned after `spot_check_retention_h`; failures are kept with their sample, at most
    `spot_check_samples_kept` per edge (the oldest dropped): what an admin reviews before trusting an edge."""

    __tablename__ = "spot_checks"
    __table_args__ = (Index("ix_spot_checks_edge_passed_at", "edge", "passed", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    edge: Mapped[str] = mapped_column(String(64))
    app: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(200))
    passed: Mapped[bool] = mapped_column(Boolean)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    request_sha256: Mapped[str] = mapped_column(String(64))
    reporter: Mapped[str] = mapped_column(String(64))  # the credential's actor (service:<id>, worker:<id>)
    sample: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # where the edge head's HAProxy forwarded the request (rma_ray.upstream), and the donor at that address
    upstream: Mapped[str | None] = mapped_column(String(64), nullable=True)
    donor: Mapped[str | None] = mapped_column(String(12), nullable=True, index=True)


class DonorReputation(Base):
    """An edge donor's own decayed pass rate, over the spot-checks of answers its replicas gave (attributed by
    the edge head's HAProxy: rma_ray.upstream). Under the edge's threshold the donor is quarantined (drained),
    and the edge goes on with its other donors. Reset with its edge's (`rma edges trust`)."""

    __tablename__ = "donor_reputation"

    worker_id: Mapped[str] = mapped_column(String(12), primary_key=True)
    edge: Mapped[str] = mapped_column(String(64), index=True)
    checks: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
    passed_weight: Mapped[float] = mapped_column(Float, default=0.0)
    weight: Mapped[float] = mapped_column(Float, default=0.0)
    last_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    quarantined_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class EdgeReputation(Base):
    """An edge's decayed pass rate (exponentially weighted over checks) and its quarantine, if any. `checks`
    and `failures` count since the last reset (an admin's `rma edges trust`)."""

    __tablename__ = "edge_reputation"

    edge: Mapped[str] = mapped_column(String(64), primary_key=True)
    checks: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
    passed_weight: Mapped[float] = mapped_column(Float, default=0.0)
    weight: Mapped[float] = mapped_column(Float, default=0.0)
    last_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    quarantined_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    quarantine_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    reset_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
