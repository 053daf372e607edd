"""A donor's contribution, both ends of its wire: the reply models of `GET /api/worker/contribution` (the
coordinator answers with them, `rma status` parses into them) and the lines `rma status` prints.

The figures are the coordinator's, from Ray's and Serve's own metrics of the donor's node as the head scraped
them (admission/services/contributions.py); nothing here counts anything."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rma_ray.client import AdmissionClient, AdmissionError


class Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreditWeights(Reply):
    per_cpu_hour: float = Field(
        description="credits for one CPU-hour (one core busy for an hour) of pool work"
    )
    per_gpu_hour: float = Field(description="credits for one GPU-hour (100 % of one GPU for an hour)")
    per_1k_requests: float = Field(description="credits per 1000 requests served by replicas on the node")
    per_1k_tokens: float = Field(description="credits per 1000 LLM tokens generated on the node")


class ContributionFigures(Reply):
    cpu_s: float = Field(0.0, description="CPU-seconds used by Ray's processes on the node (pool work)")
    gpu_s: float = Field(0.0, description="GPU-seconds (utilisation x time, summed over the node's GPUs)")
    requests: int = Field(0, description="requests served by Serve replicas on the node")
    tokens: int = Field(0, description="LLM tokens generated on the node")
    credits: float = Field(0.0, description="sum of weight x amount (see weights)")


class WorkerContribution(Reply):
    worker_id: str
    name: str
    generated_at: datetime
    day_start: datetime = Field(description="today is the UTC day from here")
    today: ContributionFigures
    last_7d: ContributionFigures
    all_time: ContributionFigures
    weights: CreditWeights


def fetch(coordinator_url: str, node_token: str, timeout: float = 5.0) -> WorkerContribution:
    with AdmissionClient(coordinator_url, node_token, timeout=timeout) as client:
        return client._reply(WorkerContribution, "GET", "/api/worker/contribution")


def _line(f: ContributionFigures) -> str:
    return (
        f"{f.credits:,.2f} credits: {f.cpu_s / 3600:,.2f} CPU-h, {f.gpu_s / 3600:,.2f} GPU-h, "
        f"{f.requests:,} requests, {f.tokens:,} tokens"
    )


def render(c: WorkerContribution) -> dict[str, str]:
    """One line per span, for `rma status` (keys in its column format)."""
    return {
        "given today": _line(c.today),
        "given 7 days": _line(c.last_7d),
        "given all time": _line(c.all_time),
    }


def status_lines(membership: Any) -> dict[str, Any]:
    """What `rma status` adds on a donor: its contribution, or one line saying why it could not be read."""
    try:
        c = fetch(membership.coordinator_url, membership.node_token)
    except AdmissionError as exc:
        return {"contribution": f"unknown ({exc})"}
    return render(c)
