"""The coordinator's side of the WireGuard overlay: refuse keys seen before, allocate each donor an address,
and keep the hub's peers equal to the live donors.

Where the hub is: `rma up --overlay` runs the coordinator on the head, beside the hub interface, so the
coordinator changes the hub's peers itself (`wg set`), inside the request that admits, revokes or lets a donor
go: a revoked donor is cut off before the admin's request returns. At start-up it re-applies every live donor's
peer (a restarted head brings the hub up empty). A coordinator on another host has no hub to change: it runs
without `RMA_OVERLAY_HUB_INTERFACE`, and the overlay is then off (see the report of issue 7).

Each cluster has its own hub: the core's (`RMA_OVERLAY_*`) and one per edge (`RMA_EDGES`, an edge's
`overlay`; rma_ray.overlay.edge_hub). A donor's address comes from its cluster's subnet and its peer goes on its
cluster's hub only, so an edge donor is never a peer of the core's hub (and the head's firewall keeps the core's
Ray ports off the edge hubs' interfaces). An edge without a hub of its own (a pool without the overlay) gives
its donors no overlay part.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import Worker
from admission.state import AppState
from rma_ray import overlay
from rma_ray.edges import CORE
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


@dataclass(frozen=True)
class HubRef:
    """One cluster's hub on this machine, as the coordinator was told of it."""

    interface: str
    public_key: str
    endpoint: str
    subnet: str


def hub_for(settings: Settings, cluster: str) -> HubRef | None:
    """The hub a donor of `cluster` is a peer of: the core's for the core, the edge's own for an edge (None
    without an overlay, or for an edge that has no hub)."""
    if not settings.overlay_enabled:
        return None
    if cluster == CORE:
        return HubRef(
            settings.overlay_hub_interface or "",
            settings.overlay_hub_public_key or "",
            settings.overlay_hub_endpoint or "",
            settings.overlay_subnet,
        )
    edge = settings.edge(cluster)
    if edge is None or edge.overlay is None:
        return None
    o = edge.overlay
    return HubRef(o.interface, o.public_key, o.endpoint, o.subnet)


def hubs(settings: Settings) -> dict[str, HubRef]:
    """cluster -> its hub, for every cluster that has one."""
    out = {c: hub_for(settings, c) for c in settings.clusters}
    return {c: h for c, h in out.items() if h is not None}


def taken(session: Session) -> list[str]:
    return [
        ip for ip in session.scalars(select(Worker.overlay_ip).where(Worker.overlay_ip.is_not(None))) if ip
    ]


def admit(
    state: AppState, session: Session, worker: Worker, req: schemas.OverlayRequest | None
) -> schemas.OverlayInfo | None:
    """Give the (flushed) worker an address from its cluster's subnet and put its peer on its cluster's hub."""
    s = state.settings
    hub = hub_for(s, worker.cluster or CORE)
    if hub is None or req is None:
        return None
    for _ in range(5):  # another coordinator transaction may take the same address first (Postgres)
        address = overlay.next_free(hub.subnet, taken(session))
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
        overlay.set_peer(hub.interface, req.public_key, f"{address}/32")
    except overlay.OverlayError as exc:
        log.error("overlay hub: %s", exc)
        raise ApiError(
            503,
            "overlay_unavailable",
            "the pool's overlay hub is not available; tell the pool admin (the join token was not used)",
        ) from None
    return schemas.OverlayInfo(
        address=address,
        prefix=ipaddress.ip_network(hub.subnet).prefixlen,
        hub_address=overlay.hub_address(hub.subnet),
        hub_public_key=hub.public_key,
        hub_endpoint=hub.endpoint,
        keepalive_s=s.overlay_keepalive_s,
        mtu=s.overlay_mtu,
    )


def cut(state: AppState, worker: Worker) -> None:
    """Remove the donor's peer from its cluster's hub (its traffic stops at once) and release its address. The
    key stays in the row, so it cannot join again."""
    hub = hub_for(state.settings, worker.cluster or CORE)
    if worker.wg_public_key and hub is not None:
        try:
            overlay.remove_peer(hub.interface, worker.wg_public_key)
        except overlay.OverlayError as exc:  # the hub is down: nothing reaches the donor through it anyway
            log.error("overlay hub: %s", exc)
    worker.overlay_ip = None


def _belongs(settings: Settings, cluster: str, hub: HubRef, worker: Worker) -> bool:
    """Whether a live donor's stored peer belongs on its cluster's hub: its address inside the hub's subnet
    (a row from before a subnet change would otherwise route a foreign address), and, on the core's hub of a
    pool with edges, a trusted donor only (an untrusted one that joined the core before edges existed belongs
    to an edge now)."""
    try:
        inside = ipaddress.ip_address(worker.overlay_ip or "") in ipaddress.ip_network(hub.subnet)
    except ValueError:
        inside = False
    return inside and (cluster != CORE or not settings.edges or bool(worker.trusted))


def sync(state: AppState, session: Session) -> tuple[int, int]:
    """Make each hub's peers exactly the live donors' of its cluster (after a restart of the head or of the
    coordinator). A live row whose peer does not belong there (_belongs) is treated as gone: its peer removed,
    its address cleared, so that its next rejoin gets a fresh one. Returns (added, removed), over every hub."""
    added = removed = 0
    for cluster, hub in hubs(state.settings).items():
        want = {}
        for w in session.scalars(
            select(Worker).where(
                Worker.overlay_ip.is_not(None),
                Worker.revoked_at.is_(None),
                Worker.left_at.is_(None),
                Worker.cluster == cluster,
            )
        ):
            if _belongs(state.settings, cluster, hub, w):
                want[w.wg_public_key] = w.overlay_ip
            else:
                log.warning(
                    "overlay: %s's peer does not belong on %s; its address is released", w.id, hub.interface
                )
                w.overlay_ip = None
        have = {p.public_key: p.allowed_ips for p in overlay.peers_of(hub.interface)}
        gone = [k for k in have if k not in want]
        for key in gone:
            overlay.remove_peer(hub.interface, key)
        new = [k for k, ip in want.items() if k and have.get(k) != [f"{ip}/32"]]
        for key in new:
            overlay.set_peer(hub.interface, key, f"{want[key]}/32")
        added, removed = added + len(new), removed + len(gone)
    return added, removed
