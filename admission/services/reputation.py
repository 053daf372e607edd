"""Spot-checks and reputation of edge clusters: the core's gateways re-check a sampled fraction of edge
answers on core replicas (off the request path) and report each verdict here (`POST
/api/service/spot-checks`). Each edge keeps a decayed pass rate; an edge under `spot_check_quarantine_below`,
once it has had `spot_check_min_checks` checks, is quarantined: left out of the edge routes (the core serves
its share at once), audited, shown on the registry page.

An LLM verdict also names the donor that answered, where it can: the edge head's HAProxy writes the address of
the replica it forwarded to (rma_ray.upstream; a donor cannot set it), and the donor registered at that address
(its overlay address, else the address it registered from, when exactly one donor of the edge has it) gets the
verdict too. A donor keeps its own decayed pass rate on the same terms as its edge; under the threshold it is
quarantined like a donor whose hardware lied (drained, flagged, audited) and the edge goes on with its other
donors. The edge's own rate counts every verdict, attributed or not: the backstop for answers no donor could be
named for (the Python proxy instead of HAProxy, two donors behind one NAT address).

The pass rate is exponentially weighted over checks, not over hours: evidence arrives one check at a time,
so the number of checks behind the rate is what bounds its noise, and a quiet edge neither forgets its
failures by waiting nor loses its good record for want of traffic. With half-life h each older verdict weighs
d = 2^(-1/h) times the next: rate = sum(d^k * passed_k) / sum(d^k). From a long clean record, an edge that
starts failing every check falls under a threshold t after h * log2(1/t) failures (17 for h = 50, t = 0.8);
a new edge that fails every check is quarantined at the minimum number of checks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import DonorReputation, EdgeReputation, SpotCheck, Worker, utcnow
from admission.services import audit
from rma_ray.settings import Settings
from rma_ray.upstream import upstream_host

log = logging.getLogger("rma.admission.reputation")

# the kinds whose answer the edge's ingress replica computes itself: the LLM (an edge LLM is its own ingress:
# deployments.llm.config.direct_ingress). The embeddings and documents apps' ingress hands the work to another
# deployment (the embedder, OCR), whose replica may run on another donor: naming the ingress's donor could blame
# an honest one, so those verdicts stay the edge's alone.
ATTRIBUTED_KINDS = frozenset({"llm"})

# the wire truncates each of the sample's three parts to 4 KiB; JSON escaping can grow them, so the stored
# sample is bounded by its encoded size (a larger one is kept cut, marked as such)
SAMPLE_MAX_BYTES = 16 * 1024


@dataclass(frozen=True)
class Tally:
    """The decayed sums behind a pass rate: weighted passes and total weight."""

    passed_weight: float = 0.0
    weight: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.passed_weight / self.weight if self.weight > 0 else None


def decay(half_life_checks: float) -> float:
    """The factor each verdict's weight shrinks by with every newer check: half after `half_life_checks`."""
    if half_life_checks <= 0:
        raise ValueError("the half-life must be positive")
    return float(0.5 ** (1.0 / half_life_checks))


def add(tally: Tally, passed: bool, half_life_checks: float) -> Tally:
    d = decay(half_life_checks)
    return Tally(d * tally.passed_weight + (1.0 if passed else 0.0), d * tally.weight + 1.0)


def quarantines(checks: int, rate: float | None, min_checks: int, below: float) -> bool:
    """No verdict before `min_checks` checks; after them, a rate under `below` quarantines."""
    return rate is not None and checks >= min_checks and rate < below


def bounded_sample(sample: dict[str, Any] | None) -> dict[str, Any] | None:
    if sample is None:
        return None
    # a lone surrogate ("\\ud800" in the report's JSON) cannot be encoded: replaced, never a 500 that would lose
    # the failing verdict
    raw = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    if len(raw) <= SAMPLE_MAX_BYTES:
        return dict(json.loads(raw))
    cut = raw[: SAMPLE_MAX_BYTES - 64].decode(errors="ignore")
    return {"truncated": True, "json": cut}


def _edge_known(settings: Settings, name: str) -> None:
    if settings.edge(name) is None:
        known = ", ".join(e.name for e in settings.edges) or "none (this pool runs without edges)"
        raise ApiError(422, "unknown_edge", f"edge: no edge cluster {name!r}; known edges: {known}")


def _locked(session: Session, model: Any, key: str, **values: Any) -> Any:
    """The reputation row of `model` whose primary key `key` has `values[key]`, made if missing (empty
    counts), locked for this transaction where the database can (two gateways reporting on one edge at once
    update it one after the other)."""
    dialect = session.get_bind().dialect.name
    ins = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        ins(model)
        .values(**values, checks=0, failures=0, passed_weight=0.0, weight=0.0)
        .on_conflict_do_nothing(index_elements=[key])
    )
    # populate_existing: the values another transaction committed while this one waited for the lock
    return session.scalars(
        select(model)
        .where(getattr(model, key) == values[key])
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()


def _row(session: Session, edge: str) -> EdgeReputation:
    """The edge's reputation row, made if missing, locked (_locked)."""
    row: EdgeReputation = _locked(session, EdgeReputation, "edge", edge=edge)
    return row


def _count(
    row: EdgeReputation | DonorReputation, passed: bool, settings: Settings, now: datetime
) -> float | None:
    """One more verdict on `row`'s record, at `now`; its decayed pass rate after it."""
    tally = add(Tally(row.passed_weight, row.weight), passed, settings.spot_check_half_life)
    row.passed_weight, row.weight = tally.passed_weight, tally.weight
    row.checks += 1
    row.failures += 0 if passed else 1
    row.last_check_at = now
    return tally.rate


def donor_at(session: Session, edge: str, upstream: str | None) -> Worker | None:
    """The edge's donor at `upstream`'s address: the one whose overlay address it is, else the only one that
    registered from it (two behind one NAT address: nobody). Donors that left are not looked at."""
    host = upstream_host(upstream)
    if host is None:
        return None
    mine = select(Worker).where(Worker.cluster == edge, Worker.left_at.is_(None))
    found = session.scalars(mine.where(Worker.overlay_ip == host)).all()
    if not found:
        found = session.scalars(
            mine.where(
                Worker.registered_ip == host, or_(Worker.overlay_ip.is_(None), Worker.overlay_ip == "")
            )
        ).all()
    return found[0] if len(found) == 1 else None


def _judge_donor(
    session: Session, settings: Settings, actor: str, body: schemas.SpotCheckReport, donor: Worker, ip: str
) -> None:
    """The verdict on the donor's own record; a donor under the threshold is quarantined: drained and flagged
    like a donor whose hardware lied (admission.services.reconcile), its node credential refused the cluster
    token, the edge serving on without it."""
    now = utcnow()
    row: DonorReputation = _locked(session, DonorReputation, "worker_id", worker_id=donor.id, edge=body.edge)
    rate = _count(row, body.passed, settings, now)
    if row.quarantined_at is None and quarantines(
        row.checks, rate, settings.spot_check_min_checks, settings.spot_check_quarantine_below
    ):
        assert rate is not None
        row.quarantined_at = now
        reason = (
            f"spot-checks: its answers' pass rate {rate:.0%} is under "
            f"{settings.spot_check_quarantine_below:.0%} ({row.failures} of {row.checks} checks of edge "
            f"{body.edge!r} failed; the last: {body.app} {body.path} scored {body.score:.4g}, a pass needs "
            f"{body.threshold:.4g})"
        )
        if not donor.quarantine_reason and donor.revoked_at is None:
            donor.quarantine_reason, donor.action = reason, "drain"
        audit.record(
            session,
            actor,
            "worker.quarantine",
            donor.id,
            ip,
            reason=reason,
            edge=body.edge,
            pass_rate=round(rate, 4),
            checks=row.checks,
            failures=row.failures,
        )
        log.warning("edge donor %s (%s) quarantined: %s", donor.id, body.edge, reason)


def report(
    session: Session, settings: Settings, actor: str, body: schemas.SpotCheckReport, ip: str = ""
) -> None:
    """Store one verdict, update the edge's pass rate (and that of the donor that answered, where known),
    quarantine either when its rate says so, prune."""
    _edge_known(settings, body.edge)
    for field in ("score", "threshold"):
        if not math.isfinite(getattr(body, field)):
            raise ApiError(422, "not_finite", f"{field}: must be a finite number")
    now = utcnow()
    row = _row(session, body.edge)
    rate = _count(row, body.passed, settings, now)
    donor = donor_at(session, body.edge, body.upstream) if body.kind in ATTRIBUTED_KINDS else None
    session.add(
        SpotCheck(
            at=now,
            edge=body.edge,
            app=body.app,
            kind=body.kind,
            path=body.path,
            passed=body.passed,
            score=body.score,
            threshold=body.threshold,
            request_sha256=body.request_sha256,
            reporter=actor,
            # a passed check's sample is client data with nothing to review: never kept
            sample=None if body.passed else bounded_sample(body.sample),
            upstream=body.upstream,
            donor=donor.id if donor else None,
        )
    )
    if donor is not None:
        _judge_donor(session, settings, actor, body, donor, ip)
    if row.quarantined_at is None and quarantines(
        row.checks, rate, settings.spot_check_min_checks, settings.spot_check_quarantine_below
    ):
        assert rate is not None
        row.quarantined_at = now
        row.quarantine_reason = (
            f"spot-checks: pass rate {rate:.0%} is under {settings.spot_check_quarantine_below:.0%} "
            f"({row.failures} of {row.checks} checks failed; the last: {body.app} {body.path} "
            f"scored {body.score:.4g}, a pass needs {body.threshold:.4g})"
        )
        audit.record(
            session,
            actor,
            "edge.quarantine",
            body.edge,
            ip,
            reason=row.quarantine_reason,
            pass_rate=round(rate, 4),
            checks=row.checks,
            failures=row.failures,
        )
        log.warning("edge %s quarantined: %s", body.edge, row.quarantine_reason)
    session.flush()
    _prune(session, settings, body.edge, now)


def _prune(session: Session, settings: Settings, edge: str, now: datetime) -> None:
    """Passes older than the retention go; failures beyond the per-edge bound go, oldest first."""
    cutoff = now - timedelta(hours=settings.spot_check_retention_h)
    # every edge's old passes (a quarantined or idle edge reports nothing that would prune its own)
    session.execute(delete(SpotCheck).where(SpotCheck.passed.is_(True), SpotCheck.at < cutoff))
    surplus = list(
        session.scalars(
            select(SpotCheck.id)
            .where(SpotCheck.edge == edge, SpotCheck.passed.is_(False))
            .order_by(SpotCheck.id.desc())
            .offset(settings.spot_check_samples_kept)
        )
    )
    if surplus:
        session.execute(delete(SpotCheck).where(SpotCheck.id.in_(surplus)))


def quarantined(session: Session) -> set[str]:
    """The edges the core's gateways must not route to."""
    return set(session.scalars(select(EdgeReputation.edge).where(EdgeReputation.quarantined_at.is_not(None))))


def trust(
    session: Session, settings: Settings, actor: str, name: str, ip: str = ""
) -> schemas.EdgeSpotChecks:
    """An admin's word after review: the quarantine is cleared and the pass rate starts again from nothing
    (the kept failing samples stay for the record)."""
    if settings.edge(name) is None:
        if session.get(EdgeReputation, name) is not None:  # an edge no longer configured: its record goes
            session.execute(delete(SpotCheck).where(SpotCheck.edge == name))
            session.execute(delete(EdgeReputation).where(EdgeReputation.edge == name))
            session.execute(delete(DonorReputation).where(DonorReputation.edge == name))
            audit.record(session, actor, "edge.trust", name, ip, removed_edge=True)
            session.flush()
            return _edge_out(session, name, None, failures=0)
        known = ", ".join(e.name for e in settings.edges) or "none (this pool runs without edges)"
        raise ApiError(404, "unknown_edge", f"no edge cluster {name!r}; known edges: {known}")
    row = _row(session, name)
    was = {
        "was_quarantined": row.quarantined_at is not None,
        "reason": row.quarantine_reason,
        "pass_rate": Tally(row.passed_weight, row.weight).rate,
        "checks": row.checks,
    }
    row.checks = row.failures = 0
    row.passed_weight = row.weight = 0.0
    row.quarantined_at, row.quarantine_reason, row.reset_at = None, None, utcnow()
    # its donors' records start again too; a donor the checks quarantined stays so (its quarantine is the
    # worker's: revoke it, or let it register again once the admin knows why)
    session.execute(delete(DonorReputation).where(DonorReputation.edge == name))
    audit.record(session, actor, "edge.trust", name, ip, **was)
    session.flush()
    return _edge_out(session, name, row, failures=0)


def _edge_out(
    session: Session, edge: str, row: EdgeReputation | None, failures: int
) -> schemas.EdgeSpotChecks:
    kept = session.scalar(
        select(func.count()).select_from(SpotCheck).where(SpotCheck.edge == edge, SpotCheck.passed.is_(False))
    )
    recent: Iterable[SpotCheck] = (
        session.scalars(
            select(SpotCheck)
            .where(SpotCheck.edge == edge, SpotCheck.passed.is_(False))
            .order_by(SpotCheck.id.desc())
            .limit(failures)
        )
        if failures
        else []
    )
    donors = _donors_out(session, edge)
    return schemas.EdgeSpotChecks(
        edge=edge,
        checks=row.checks if row else 0,
        failures=row.failures if row else 0,
        pass_rate=Tally(row.passed_weight, row.weight).rate if row else None,
        quarantined=bool(row and row.quarantined_at is not None),
        reason=row.quarantine_reason if row else None,
        since=row.quarantined_at if row else None,
        last_check_at=row.last_check_at if row else None,
        samples_kept=kept or 0,
        recent_failures=[
            schemas.SpotCheckFailure(
                id=c.id,
                at=c.at,
                app=c.app,
                kind=c.kind,
                path=c.path,
                score=c.score,
                threshold=c.threshold,
                request_sha256=c.request_sha256,
                reporter=c.reporter,
                sample=c.sample,
                upstream=c.upstream,
                donor=c.donor,
            )
            for c in recent
        ],
        donors=donors,
        unattributed=max(0, (row.checks if row else 0) - sum(d.checks for d in donors)),
    )


def _donors_out(session: Session, edge: str) -> list[schemas.DonorSpotChecks]:
    rows = session.scalars(select(DonorReputation).where(DonorReputation.edge == edge)).all()
    found = session.execute(select(Worker.id, Worker.name).where(Worker.id.in_([r.worker_id for r in rows])))
    names = {wid: name for wid, name in found}
    out = [
        schemas.DonorSpotChecks(
            id=r.worker_id,
            name=names.get(r.worker_id),
            checks=r.checks,
            failures=r.failures,
            pass_rate=Tally(r.passed_weight, r.weight).rate,
            quarantined=r.quarantined_at is not None,
            last_check_at=r.last_check_at,
        )
        for r in rows
    ]
    return sorted(out, key=lambda d: (d.pass_rate if d.pass_rate is not None else 2.0, d.id))


def overview(session: Session, settings: Settings, failures: int = 5) -> schemas.SpotChecksOut:
    """Every edge the pool runs (and any that was checked before it was taken out of the settings)."""
    rows = {r.edge: r for r in session.scalars(select(EdgeReputation))}
    names = [e.name for e in settings.edges] + sorted(set(rows) - {e.name for e in settings.edges})
    return schemas.SpotChecksOut(
        rate=settings.spot_check_rate,
        min_checks=settings.spot_check_min_checks,
        quarantine_below=settings.spot_check_quarantine_below,
        half_life_checks=settings.spot_check_half_life,
        edges=[_edge_out(session, n, rows.get(n), failures) for n in names],
    )
