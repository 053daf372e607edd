"""What one coordinator process holds in memory beside the database: the node-credential cache and the
heartbeat write-behind buffer (so that a heartbeat costs a dict write, not a transaction), the rate limiter and
the metrics. The coordinator is one process by design (a free-tier host); all writes go through it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine, Table, bindparam, update
from sqlalchemy.orm import Session, sessionmaker

from admission.models import Worker
from admission.ratelimit import IpLimiter
from rma_ray.settings import Settings


@dataclass
class NodeEntry:
    worker_id: str
    token_hash: str
    active: bool  # False once revoked or left
    action: str = "none"
    cluster: str = "core"  # the Ray cluster it belongs to (its heartbeat carries that cluster's epoch)
    trusted: bool = True  # an untrusted donor of the core, once the pool has edges, is told to leave


@dataclass
class Beat:
    at: datetime
    status: str
    current_load: float
    available_memory_mb: int | None
    ray_node_id: str | None
    resume_at: datetime | None = None


class HeartbeatBuffer:
    """Latest heartbeat per worker, flushed to the database in one bulk UPDATE every `flush_s`.

    `peek` answers the latest beat this process received, flushed or not: a reader that loaded a worker's row
    just before a flush committed, or while the flush's batch was out of the pending map and not yet written,
    would otherwise see neither the beat nor the row that holds it (an admin view said `paused` after the
    donor's next, healthy, beat). The database only ever gets beats from here, so the kept one is never older."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Beat] = {}
        # one per live worker: `drop` forgets a worker that left or was revoked
        self._latest: dict[str, Beat] = {}

    def put(self, worker_id: str, beat: Beat) -> None:
        with self._lock:
            self._pending[worker_id] = beat
            self._latest[worker_id] = beat

    def peek(self, worker_id: str) -> Beat | None:
        with self._lock:
            return self._latest.get(worker_id)

    def drop(self, worker_id: str) -> None:
        with self._lock:
            self._pending.pop(worker_id, None)
            self._latest.pop(worker_id, None)

    def flush(self, factory: sessionmaker[Session]) -> int:
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        rows = [
            {
                "wid": wid,
                "last_heartbeat_at": b.at,
                "heartbeat_status": b.status,
                "current_load": b.current_load,
                "available_memory_mb": b.available_memory_mb,
                "ray_node_id": b.ray_node_id,
                "resume_at": b.resume_at,
            }
            for wid, b in batch.items()
        ]
        table = cast(Table, Worker.__table__)  # a mapped class's table (typed as any FromClause)
        stmt = update(table).where(table.c.id == bindparam("wid"))  # one executemany, no ORM bookkeeping
        try:
            with factory() as session, session.begin():
                session.connection().execute(stmt, rows)
        except Exception:
            with self._lock:  # keep what was not written, unless a newer beat arrived meanwhile
                for wid, b in batch.items():
                    self._pending.setdefault(wid, b)
            raise
        return len(rows)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.heartbeats = Counter("rma_heartbeats", "Heartbeats accepted", registry=self.registry)
        self.registrations = Counter("rma_registrations", "Donors admitted", ["tier"], registry=self.registry)
        self.refusals = Counter(
            "rma_registrations_refused", "Registrations refused", ["reason"], registry=self.registry
        )
        self.auth_failures = Counter(
            "rma_auth_failures", "Failed authentications", ["kind"], registry=self.registry
        )
        self.rate_limited = Counter(
            "rma_rate_limited", "Requests refused by a rate limit", registry=self.registry
        )
        self.workers = Gauge(
            "rma_workers",
            "Live workers (not revoked or left) by tier and status",
            ["tier", "status"],
            registry=self.registry,
        )


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    secret_key: str
    limiter: IpLimiter
    buffer: HeartbeatBuffer = field(default_factory=HeartbeatBuffer)
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    nodes_lock: threading.Lock = field(default_factory=threading.Lock)
    # admin and service keys last seen valid ('<kind>:<id>' -> hash): a hint only, so that a valid one passes
    # its IP's failed-auth refusal without database work; the database still decides (admission.security)
    keys: dict[str, str] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    reconciler: Any = None  # admission.services.reconcile.Reconciler when a Ray head is wired
    gauges_at: float = float("-inf")  # when /metrics last refreshed the workers gauge (time.monotonic())
    _epochs: dict[str, tuple[float, str]] = field(default_factory=dict)
    edge_status: Any = None  # admission.services.edges.EdgeStatusCache, made on first use
    donor_kit: Any = None  # admission.services.donor_kit.Kit, built on the first request under /donor/
    donor_kit_failure: tuple[float, str] | None = None  # (time.monotonic(), reason) of the last failed build

    def cluster_epoch(self, cluster: str = "core") -> str:
        """A cluster token's fingerprint, re-read at most once a second (heartbeats carry their cluster's)."""
        now = time.monotonic()
        at, epoch = self._epochs.get(cluster, (float("-inf"), ""))
        if now - at > 1.0:
            epoch = self.settings.cluster_epoch(cluster)
            self._epochs[cluster] = (now, epoch)
        return epoch
