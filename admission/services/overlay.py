"""The coordinator's side of the WireGuard overlay: refuse keys seen before, allocate each donor an address,
and keep the hub's peers equal to the live donors.

Where the hub is: `rma up --overlay` runs the coordinator on the head, beside the hub interface, so the
coordinator changes the hub's peers itself (`wg set`), inside the request that admits, revokes or lets a donor
go: a revoked donor is cut off before the admin's request returns. At start-up it re-applies every live donor's
peer (a restarted head brings the hub up empty). A coordinator on another host has no hub to change: it runs
without `RMA_OVERLAY_HUB_INTERFACE`, and the overlay is then off (see the report of issue 7).
"""

from __future__ import annotations

import ipaddress
import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import Worker
from admission.state import AppState
from rma_ray import overlay
from rma_ray.settings import Settings

log = logging.getLogger("rma.admission.overlay")


def check_request(
    settings: Settings, session: Session, req: schemas.OverlayRequest | None
) -> ApiError | None:
    """Before the join token is spent: a pool with an overlay needs the donor's key, and a key seen before
    (a revoked donor's above all) never joins again. Returns the refusal, or None."""
    if not settings.overlay_enabled:
        return None
    if req is None:
        return ApiError(
            422,
            "overlay_required",
            "this pool runs a WireGuard overlay and the request carried no "
            "public key; update rma on this machine and join again",
        )
    seen = session.scalars(select(Worker).where(Worker.wg_public_key == req.public_key)).first()
    if seen is None:
        return None
    if seen.revoked_at is not None:
        return ApiError(
            403,
            "overlay_key_revoked",
            f"this WireGuard key belonged to donor {seen.id}, which the pool admin revoked; "
            f"it can never join again",
        )
    return ApiError(
        409,
        "overlay_key_reused",
        f"this WireGuard key was already used by donor {seen.id}; "
        f"each join makes a new key: run `rma join` again",
    )


def taken(session: Session) -> list[str]:
    return [
        ip for ip in session.scalars(select(Worker.overlay_ip).where(Worker.overlay_ip.is_not(None))) if ip
    ]


def admit(
    state: AppState, session: Session, worker: Worker, req: schemas.OverlayRequest | None
) -> schemas.OverlayInfo | None:
    """Give the (flushed) worker an address and put its peer on the hub."""
    s = state.settings
    if not s.overlay_enabled or req is None:
        return None
    for _ in range(5):  # another coordinator transaction may take the same address first (Postgres)
        address = overlay.next_free(s.overlay_subnet, taken(session))
        try:
            with session.begin_nested():
                worker.overlay_ip, worker.wg_public_key = address, req.public_key
                session.flush()
            break
        except IntegrityError:
            continue
    else:
        raise ApiError(503, "overlay_busy", "could not allocate an overlay address; try joining again")
    try:
        overlay.set_peer(s.overlay_hub_interface or "", req.public_key, f"{address}/32")
    except overlay.OverlayError as exc:
        log.error("overlay hub: %s", exc)
        raise ApiError(
            503,
            "overlay_unavailable",
            "the pool's overlay hub is not available; tell the pool admin (the join token was not used)",
        ) from None
    return schemas.OverlayInfo(
        address=address,
        prefix=ipaddress.ip_network(s.overlay_subnet).prefixlen,
        hub_address=overlay.hub_address(s.overlay_subnet),
        hub_public_key=s.overlay_hub_public_key or "",
        hub_endpoint=s.overlay_hub_endpoint or "",
        keepalive_s=s.overlay_keepalive_s,
        mtu=s.overlay_mtu,
    )


def cut(state: AppState, worker: Worker) -> None:
    """Remove the donor's peer from the hub (its traffic stops at once) and release its address. The key stays
    in the row, so it cannot join again."""
    if worker.wg_public_key and state.settings.overlay_hub_interface:
        try:
            overlay.remove_peer(state.settings.overlay_hub_interface, worker.wg_public_key)
        except overlay.OverlayError as exc:  # the hub is down: nothing reaches the donor through it anyway
            log.error("overlay hub: %s", exc)
    worker.overlay_ip = None


def sync(state: AppState, session: Session) -> tuple[int, int]:
    """Make the hub's peers exactly the live donors' (after a restart of the head or of the coordinator).
    Returns (added, removed)."""
    s = state.settings
    if not s.overlay_enabled:
        return 0, 0
    want = {
        w.wg_public_key: w.overlay_ip
        for w in session.scalars(
            select(Worker).where(
                Worker.overlay_ip.is_not(None), Worker.revoked_at.is_(None), Worker.left_at.is_(None)
            )
        )
    }
    have = {p.public_key: p.allowed_ips for p in overlay.peers_of(s.overlay_hub_interface or "")}
    removed = [k for k in have if k not in want]
    for key in removed:
        overlay.remove_peer(s.overlay_hub_interface or "", key)
    added = [k for k, ip in want.items() if k and have.get(k) != [f"{ip}/32"]]
    for key in added:
        overlay.set_peer(s.overlay_hub_interface or "", key, f"{want[key]}/32")
    return len(added), len(removed)
