"""The contribution ledger: a donor's own figures (its node credential) and every donor's (an admin key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from admission import schemas, security
from admission.deps import AdminDep, NodeDep, SessionDep, State
from admission.services import contributions

router = APIRouter(tags=["contributions"])

HoursQ = Annotated[
    int,
    Query(
        ge=1, le=24 * 90, description="the hourly series' length in hours (1 to 2160; default 168, a week)"
    ),
]


@router.get(
    "/api/worker/contribution", response_model=schemas.WorkerContribution, openapi_extra=security.NODE
)
def worker_contribution(node: NodeDep, state: State, session: SessionDep) -> schemas.WorkerContribution:
    """What this donor's node gave the pool: today (UTC), the last 7 days and all time, with its credits; from
    the head's scrapes of Ray's and Serve's metrics of the node."""
    return contributions.for_worker(state, session, node.worker_id)


@router.get("/api/admin/contributions", response_model=schemas.ContributionsOut, openapi_extra=security.ADMIN)
def all_contributions(
    admin: AdminDep, state: State, session: SessionDep, hours: HoursQ = contributions.SERIES_HOURS
) -> schemas.ContributionsOut:
    """Every donor's contribution and credits, best first, with an hourly series for sparklines."""
    return contributions.overview(state, session, hours=hours)
