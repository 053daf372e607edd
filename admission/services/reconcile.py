"""Keeping the registry true against Ray.

Every few seconds: read the live Ray nodes from the head's dashboard (`GET /api/v0/nodes`, bearer cluster token),
match each to its worker by the `rma.io/node` label, and record what Ray says (alive/dead, node id). Labels are
declared by the joining node, so the registry is the source of truth: a node whose labels or Ray-reported
hardware disagree with its registration is quarantined (drained, shown to the admin); a Ray node that matches no
admitted worker is flagged as an intruder. Since any holder of the cluster token can start a node with any
label, a label is also checked against where the node is: a node whose address is not its donor's (the overlay
address where the donor has one, else the address it registered from), or a second live node claiming the same
donor from another address, quarantines that donor and drains every node that claims it. Replicas pending for
lack of a node of a tier become that tier's demand, which the tier choice at registration reads.

Each cluster is read on its own: the core from its dashboard with the core token, every edge from its own
dashboard with its own token (`RMA_EDGES`), with its own view, demand and drains. A node is matched only to a
donor of the cluster it runs in: a node claiming a donor of another cluster is an intruder there.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from admission.models import TierDemand, Worker, utcnow
from admission.services import audit
from admission.state import AppState
from rma_ray.edges import CORE, LABEL_CLUSTER
from rma_ray.tiers import LABEL_NODE, LABEL_OLLAMA, LABEL_TIER, LABEL_TRUSTED, TIER_ORDER

log = logging.getLogger("rma.reconciler")
MB = 1024 * 1024
# A donor's agent restarts a dead raylet at once; the dead one stays ALIVE in Ray until its health checks fail
# (~6 s with the head's fast checks, ~60 s with Ray's defaults). Two live nodes on one address are that, until
# they have lasted longer than this; two on different addresses are never that.
DUPLICATE_GRACE_S = 90.0


@dataclass
class RayView:
    """What the last pass saw; read by the registry page and /api/admin/ray."""

    at: datetime | None = None
    error: str | None = None
    nodes_alive: int = 0
    intruders: list[dict[str, Any]] = field(default_factory=list)
    drained: set[str] = field(default_factory=set)  # ray node ids we already asked to drain
    # store supervisors (actors `rma-store-<name>`) waiting for a node their label selector matches
    pending_stores: dict[str, dict[str, str]] = field(default_factory=dict)
    # worker id -> when two or more live nodes on one address were first seen claiming it
    duplicates_since: dict[str, datetime] = field(default_factory=dict)


def mismatch(worker: Worker, node: dict[str, Any]) -> str | None:
    """Why a live node disagrees with its registration, or None."""
    labels = node.get("labels") or {}
    want = worker.labels
    for key in (LABEL_TIER, LABEL_TRUSTED, LABEL_OLLAMA, LABEL_CLUSTER):
        if labels.get(key) != want.get(key):
            return f"label {key}={labels.get(key)!r} on the Ray node, registered {want.get(key)!r}"
    res = node.get("resources_total") or {}
    gpus_reg = worker.capabilities.get("gpus") or []
    ray_gpus = float(res.get("GPU", 0))
    if worker.tier == "gpu" and ray_gpus < 1:
        names = ", ".join(g.get("name", "?") for g in gpus_reg) or "none"
        return (
            f"registered as gpu tier with {len(gpus_reg)} GPU(s) ({names}) but Ray reports 0 GPUs on its node"
        )
    if ray_gpus > len(gpus_reg):
        return f"Ray reports {ray_gpus:g} GPUs, registered {len(gpus_reg)}"
    accel = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
    if (
        accel
        and gpus_reg
        and not any(a.lower() in g.get("name", "").lower().replace(" ", "") for a in accel for g in gpus_reg)
    ):
        return f"Ray reports accelerator {accel[0]}, registered " + ", ".join(
            g.get("name", "?") for g in gpus_reg
        )
    ray_mem_mb = (float(res.get("memory", 0)) + float(res.get("object_store_memory", 0))) / MB
    reg_mb = float(worker.capabilities.get("ram_mb", 0))
    if reg_mb and ray_mem_mb > reg_mb * 1.25:
        return f"Ray sees {ray_mem_mb:.0f} MiB of memory, registered {reg_mb:.0f} MiB"
    return None


def _usable_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address a node can be held to: a real IP, not loopback or unspecified (a donor that registered
    through loopback runs on the coordinator's machine, whose node may advertise any of its addresses)."""
    try:
        ip = ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None
    return None if ip.is_loopback or ip.is_unspecified else ip


def expected_address(worker: Worker, registered: bool = True) -> tuple[str, str] | None:
    """(address, what it is) that the donor's Ray node must advertise, or None where nothing is recorded.
    `registered`: fall back to the address it registered from (off where a proxy or NAT hides it)."""
    if _usable_ip(worker.overlay_ip):
        return str(worker.overlay_ip), "overlay address"
    if registered and _usable_ip(worker.registered_ip):
        return worker.registered_ip, "registered address"
    return None


def claim_problem(
    worker: Worker, live: list[dict[str, Any]], duplicate_for_s: float = 0.0, registered: bool = True
) -> str | None:
    """Why the live Ray nodes labelled as this donor cannot all be it, or None. `duplicate_for_s`: how long
    two or more of them have been live on one address (a restart's dead twin, until Ray notices it died)."""
    want = expected_address(worker, registered)
    if want is not None:
        for node in live:
            got = _usable_ip(node.get("node_ip"))
            if got != ipaddress.ip_address(want[0]):
                return (
                    f"Ray node {str(node.get('node_id'))[:12]} at {node.get('node_ip') or '?'} claims "
                    f"donor {worker.id}, whose {want[1]} is {want[0]}"
                )
    if len(live) > 1:
        ips = sorted({str(n.get("node_ip") or "?") for n in live})
        if len(ips) > 1:
            return (
                f"{len(live)} live Ray nodes claim donor {worker.id}, from different addresses: "
                f"{', '.join(ips)}"
            )
        if duplicate_for_s >= DUPLICATE_GRACE_S:
            return (
                f"{len(live)} live Ray nodes at {ips[0]} have claimed donor {worker.id} for "
                f"{duplicate_for_s:.0f} s"
            )
    return None


def fetch(state: AppState, cluster: str = CORE) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    s = state.settings
    token = s.cluster_token(cluster)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=s.cluster_dashboard(cluster) or "", headers=headers, timeout=5) as http:
        nodes = http.get("/api/v0/nodes", params={"limit": 10000, "detail": "true"})
        nodes.raise_for_status()
        actors = http.get(
            "/api/v0/actors",
            params={
                "limit": 10000,
                "detail": "true",
                "filter_keys": "state",
                "filter_predicates": "=",
                "filter_values": "PENDING_CREATION",
            },
        )
        actors.raise_for_status()
    return nodes.json()["data"]["result"]["result"], actors.json()["data"]["result"]["result"]


def apply(
    state: AppState,
    session: Session,
    nodes: list[dict[str, Any]],
    pending: list[dict[str, Any]],
    view: RayView,
    cluster: str = CORE,
) -> list[tuple[str, str]]:
    """Update the registry from one reading of `cluster`; return (ray node id, reason) of nodes to drain."""
    now = utcnow()
    by_worker: dict[str, dict[str, Any]] = {}
    live_by_worker: dict[str, list[dict[str, Any]]] = {}
    intruders = []
    everyone = {w.id: w for w in session.scalars(select(Worker))}
    workers = {wid: w for wid, w in everyone.items() if w.cluster == cluster}
    for node in nodes:
        labels = node.get("labels") or {}
        if node.get("is_head_node"):
            continue
        wid = labels.get(LABEL_NODE)
        w = workers.get(wid or "")
        alive = node.get("state") == "ALIVE"
        if w is None or w.revoked_at is not None or w.left_at is not None:
            if alive:
                other = everyone.get(wid or "")
                why = (
                    "no rma.io/node label"
                    if not wid
                    else f"worker {wid} belongs to cluster {other.cluster!r}, not {cluster!r}"
                    if other is not None and w is None
                    else f"unknown worker {wid}"
                    if w is None
                    else f"worker {wid} was {'revoked' if w.revoked_at else 'unregistered'}"
                )
                intruders.append({"node_id": node["node_id"], "node_ip": node.get("node_ip"), "reason": why})
            continue
        if alive:
            live_by_worker.setdefault(w.id, []).append(node)
        # the newest node per worker wins (a restarted node leaves a DEAD twin behind)
        prev = by_worker.get(w.id)
        if (
            prev is None
            or (alive and prev.get("state") != "ALIVE")
            or (
                (node.get("start_time_ms") or 0) > (prev.get("start_time_ms") or 0)
                and alive == (prev.get("state") == "ALIVE")
            )
        ):
            by_worker[w.id] = node
    to_drain: list[tuple[str, str]] = []
    for wid, node in by_worker.items():
        w = workers[wid]
        alive = node.get("state") == "ALIVE"
        w.ray_node_id, w.ray_alive, w.ray_seen_at = node["node_id"], alive, now
        live = live_by_worker.get(wid, [])
        if len(live) > 1 and len({n.get("node_ip") for n in live}) == 1:
            since = view.duplicates_since.setdefault(wid, now)
        else:
            since = view.duplicates_since.pop(wid, now)
        if alive and not w.quarantine_reason:
            claim = claim_problem(
                w, live, (now - since).total_seconds(), state.settings.reconcile_registered_address
            )
            problem = claim or mismatch(w, node)
            if problem:
                w.quarantine_reason, w.action = problem, "drain"
                nodes_of = [{"node_id": n["node_id"], "node_ip": n.get("node_ip")} for n in live]
                audit.record(
                    session,
                    "reconciler",
                    "worker.quarantine",
                    w.id,
                    str(node.get("node_ip") or ""),
                    reason=problem,
                    kind="claim" if claim else "mismatch",
                    nodes=nodes_of,
                )
                log.warning("quarantined worker %s: %s", w.id, problem)
        if w.quarantine_reason or w.revoked_at:  # every node claiming it, impostor and donor alike
            to_drain += [
                (n["node_id"], w.quarantine_reason or "revoked")
                for n in live
                if n["node_id"] not in view.drained
            ]
    for wid in set(view.duplicates_since) - set(by_worker):
        del view.duplicates_since[wid]
    for w in workers.values():
        if w.revoked_at is None and w.left_at is None and w.id not in by_worker and w.ray_alive:
            w.ray_alive, w.ray_seen_at = False, now  # its node vanished from Ray altogether
    for intruder in intruders:
        if intruder["node_id"] not in {i["node_id"] for i in view.intruders}:
            audit.record(
                session,
                "reconciler",
                "ray.intruder",
                intruder["node_id"][:12],
                intruder.get("node_ip") or "",
                reason=intruder["reason"],
                **({"cluster": cluster} if cluster != CORE else {}),
            )
        if intruder["node_id"] not in view.drained:
            to_drain.append((intruder["node_id"], intruder["reason"]))
    demand = {str(t): 0 for t in TIER_ORDER}
    for actor in pending:
        tier = (actor.get("label_selector") or {}).get(LABEL_TIER)
        if tier in demand:
            demand[tier] += 1
    for tier, n in demand.items():
        row = session.get(TierDemand, (cluster, tier))
        if row is None:
            session.add(TierDemand(cluster=cluster, tier=tier, pending=n, updated_at=now))
        elif row.pending != n:
            row.pending, row.updated_at = n, now
    view.at, view.error = now, None
    view.nodes_alive = sum(1 for n in nodes if n.get("state") == "ALIVE")
    view.intruders = intruders
    view.pending_stores = {
        a["name"][len("rma-store-") :]: dict(a.get("label_selector") or {})
        for a in pending
        if str(a.get("name") or "").startswith("rma-store-")
    }
    return to_drain


def reconcile_once(state: AppState, view: RayView, cluster: str = CORE) -> None:
    try:
        nodes, pending = fetch(state, cluster)
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        view.error = f"cannot read Ray's state: {exc}"
        return
    with state.sessions() as session, session.begin():
        to_drain = apply(state, session, nodes, pending, view, cluster)
    address, token_file = state.settings.cluster_address(cluster), state.settings.cluster_token_file(cluster)
    if to_drain and address and token_file:
        from rma_ray.raynode import drain_node

        for node_id, why in to_drain:
            try:
                drain_node(address, token_file, node_id, f"RMA Pool: {why}", 60)
                view.drained.add(node_id)
            except Exception as exc:  # the node may already be gone
                log.warning("drain of %s failed: %s", node_id[:12], exc)


class Reconciler:
    def __init__(self, state: AppState, interval_s: float = 2.0) -> None:
        self.state, self.interval_s = state, interval_s
        # one view per cluster with a dashboard: the core's (when wired) and every edge's
        self.views = {c: RayView() for c in state.settings.clusters if state.settings.cluster_dashboard(c)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rma-reconciler", daemon=True)
        from admission.services.metrics import Collector

        self.collector = Collector(state)  # Serve's request metrics, scraped on a sibling thread

    def start(self) -> Reconciler:
        self._thread.start()
        # the collector reads every cluster's Serve metrics (the core's and each edge's) and the ledger's; it
        # runs where the core's dashboard is wired (the pool totals are the core ingress's)
        if self.state.settings.ray_dashboard_url:
            self.collector.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.collector.stop()
        self._thread.join(10)

    @property
    def view(self) -> RayView:
        """The core's view (what the registry's stores and /api/admin/ray have always read)."""
        return self.views.get(CORE) or RayView()  # a pool whose core has no dashboard: nothing seen

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for cluster, view in list(self.views.items()):
                    reconcile_once(self.state, view, cluster)
                self._sync_actions()
            except Exception:
                log.exception("reconcile pass failed")
            self._stop.wait(self.interval_s)

    def _sync_actions(self) -> None:
        """Quarantined workers must see action=drain on their next heartbeat (the cache serves heartbeats)."""
        with self.state.sessions() as session:
            rows = session.execute(
                select(Worker.id, Worker.action).where(Worker.quarantine_reason.is_not(None))
            ).all()
        with self.state.nodes_lock:
            for wid, action in rows:
                entry = self.state.nodes.get(wid)
                if entry is not None:
                    entry.action = action
