"""The batch queue's figures on the coordinator: what the batches replicas report after each sweep
(`POST /api/service/batch-queue`, a service credential), for `GET /api/admin/batch-queue` and the registry
page. The queue lives in the services' Postgres, which the coordinator does not reach, so the replicas read it
and report. Kept in memory per replica (the last report wins): the figures are only news while fresh, and a
replica silent for `STALE_S` is dropped."""

from __future__ import annotations

import threading
from datetime import datetime

from admission import schemas
from admission.errors import ApiError
from admission.models import utcnow

STALE_S = 300.0  # a replica's figures are dropped after 5 minutes without a report
MAX_REPLICAS = 64  # replicas kept at once: a reporter cannot grow the coordinator's memory at will
WINDOW_MIN = 10.0  # `finished_10min` counts the last 10 minutes

_lock = threading.Lock()
_replicas: dict[str, schemas.BatchQueueReplica] = {}


def report(body: schemas.BatchQueueReport, now: datetime | None = None) -> None:
    now = now or utcnow()
    row = schemas.BatchQueueReplica(
        **body.model_dump(), reported_at=now, per_minute=round(body.finished_10min / WINDOW_MIN, 2)
    )
    with _lock:
        _drop_stale(now)
        if body.replica not in _replicas and len(_replicas) >= MAX_REPLICAS:
            raise ApiError(
                429,
                "too_many_replicas",
                f"{MAX_REPLICAS} batches replicas reported in the last {STALE_S / 60:g} minutes; "
                "a new one is kept once one of them goes quiet",
                headers={"Retry-After": "60"},
            )
        _replicas[body.replica] = row


def _drop_stale(now: datetime) -> None:
    for name, r in list(_replicas.items()):
        if (now - r.reported_at).total_seconds() > STALE_S:
            del _replicas[name]


def summary(now: datetime | None = None) -> schemas.BatchQueueOut:
    """The fresh reports, by replica name (none: no replica has reported in the last 5 minutes)."""
    now = now or utcnow()
    with _lock:
        _drop_stale(now)
        return schemas.BatchQueueOut(replicas=sorted(_replicas.values(), key=lambda r: r.replica))
