"""One reconcile pass applied to a real registry (SQLite and PostgreSQL), fed Ray's node and actor listings
as the dashboard returns them. The live path (real Ray) is in tests/e2e/test_membership.py."""

from __future__ import annotations

from admission.models import TierDemand, Worker
from admission.services.reconcile import RayView, apply
from tests.integration.conftest import Coordinator

GIB = 1024**3


def ray_node(node_id: str, labels: dict, alive: bool = True, start: int = 1, **res: float) -> dict:  # type: ignore[type-arg]
    return {
        "node_id": node_id,
        "node_ip": "10.0.0.9",
        "is_head_node": False,
        "state": "ALIVE" if alive else "DEAD",
        "labels": labels,
        "start_time_ms": start,
        "resources_total": {"CPU": 1, "memory": 4 * GIB, "object_store_memory": GIB, **res},
    }


def test_apply_tracks_quarantines_flags_and_counts_demand(coordinator: Coordinator) -> None:
    honest = coordinator.join()
    liar = coordinator.join(
        {
            "cpu_cores": 16,
            "ram_mb": 128887,
            "disk_free_gb": 64,
            "gpus": [{"name": "NVIDIA H200", "memory_mb": 143771}],
        }
    )
    gone = coordinator.join()
    revoked = coordinator.join()
    coordinator.admin("POST", f"/api/admin/workers/{revoked['worker_id']}/revoke")
    nodes = [
        ray_node("a" * 56, honest["labels"]),
        ray_node("b" * 56, liar["labels"]),
        ray_node("c" * 56, gone["labels"], alive=False),
        ray_node("d" * 56, revoked["labels"]),
        ray_node("e" * 56, {"rma.io/tier": "service"}),
        {**ray_node("f" * 56, {}), "is_head_node": True},
    ]
    pending = [
        {"label_selector": {"rma.io/tier": "gpu"}},
        {"label_selector": {"rma.io/tier": "gpu"}},
        {"label_selector": {"rma.io/tier": "data"}},
        {"label_selector": None},
    ]
    view = RayView()
    state = coordinator.state
    with state.sessions() as s, s.begin():
        to_drain = apply(state, s, nodes, pending, view)
    with state.sessions() as s:
        h, liar_w, g = (s.get(Worker, x["worker_id"]) for x in (honest, liar, gone))
        assert h.ray_alive is True and h.ray_node_id == "a" * 56 and h.quarantine_reason is None
        assert liar_w.quarantine_reason and "0 GPUs" in liar_w.quarantine_reason and liar_w.action == "drain"
        assert g.ray_alive is False
        assert {r.tier: r.pending for r in s.query(TierDemand)} == {"gpu": 2, "service": 0, "data": 1}
    reasons = {i["node_id"][0]: i["reason"] for i in view.intruders}
    assert set(reasons) == {"d", "e"} and "revoked" in reasons["d"] and "no rma.io/node" in reasons["e"]
    assert {n[0][0] for n in to_drain} == {"b", "d", "e"}
    assert (
        coordinator.admin("GET", f"/api/admin/workers/{liar['worker_id']}").json()["status"] == "quarantined"
    )
    assert coordinator.admin("GET", f"/api/admin/workers/{gone['worker_id']}").json()["status"] == "offline"
    audit = {e["action"] for e in coordinator.admin("GET", "/api/admin/audit").json()}
    assert {"worker.quarantine", "ray.intruder"} <= audit
