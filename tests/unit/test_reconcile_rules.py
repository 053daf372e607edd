"""The reconciler's judgement of a live Ray node against its registration (pure; no Ray)."""

from __future__ import annotations

import pytest

from admission.models import Worker
from admission.services.reconcile import DUPLICATE_GRACE_S, RayView, apply, claim_problem, mismatch

GIB = 1024**3


def worker(
    tier: str = "service", trusted: bool = False, gpus: list | None = None, ram_mb: int = 16000
) -> Worker:  # type: ignore[type-arg]
    labels = {"rma.io/tier": tier, "rma.io/node": "w1", "rma.io/trusted": "true" if trusted else "false"}
    return Worker(
        id="w1",
        tier=tier,
        trusted=trusted,
        labels=labels,
        capabilities={"cpu_cores": 4, "ram_mb": ram_mb, "gpus": gpus or []},
    )


def node(labels: dict | None = None, **resources: float) -> dict:  # type: ignore[type-arg]
    base = {"rma.io/tier": "service", "rma.io/node": "w1", "rma.io/trusted": "false"}
    return {
        "labels": {**base, **(labels or {})},
        "resources_total": {"CPU": 1, "memory": 8 * GIB, "object_store_memory": 2 * GIB, **resources},
    }


H200 = [{"name": "NVIDIA H200", "memory_mb": 143771}]


@pytest.mark.parametrize(
    ("w", "n", "expect"),
    [
        (worker(), node(), None),
        (worker(), node({"rma.io/tier": "gpu"}), "label rma.io/tier"),
        (worker(), node({"rma.io/trusted": "true"}), "label rma.io/trusted"),
        (worker("gpu", gpus=H200), node({"rma.io/tier": "gpu"}), "0 GPUs"),
        (worker("gpu", gpus=H200), node({"rma.io/tier": "gpu"}, GPU=1, **{"accelerator_type:H200": 1}), None),
        (
            worker("gpu", gpus=H200),
            node({"rma.io/tier": "gpu"}, GPU=1, **{"accelerator_type:A100": 1}),
            "accelerator A100",
        ),
        (worker(), node(GPU=2), "Ray reports 2 GPUs, registered 0"),
        (worker(ram_mb=4000), node(), "Ray sees 10240 MiB"),
        (worker(ram_mb=64000), node(), None),  # a donor capping Ray's memory is fine
    ],
)
def test_mismatch(w: Worker, n: dict, expect: str | None) -> None:  # type: ignore[type-arg]
    got = mismatch(w, n)
    if expect is None:
        assert got is None
    else:
        assert got is not None and expect in got


def donor(overlay_ip: str | None = None, registered_ip: str = "") -> Worker:
    w = worker()
    w.overlay_ip, w.registered_ip = overlay_ip, registered_ip
    return w


def live(ip: str, node_id: str = "n1") -> dict:  # type: ignore[type-arg]
    return {"node_id": node_id * 20, "node_ip": ip, "state": "ALIVE", "labels": {"rma.io/node": "w1"}}


@pytest.mark.parametrize(
    ("w", "nodes", "dup_s", "registered", "expect"),
    [
        # one node where the donor is
        (donor("10.88.0.5", "192.0.2.7"), [live("10.88.0.5")], 0, True, None),
        (donor(None, "192.0.2.7"), [live("192.0.2.7")], 0, True, None),
        # one node somewhere else: the overlay address wins over the registered one
        (donor("10.88.0.5", "192.0.2.7"), [live("192.0.2.7")], 0, True, "whose overlay address is 10.88.0.5"),
        (donor(None, "192.0.2.7"), [live("192.0.2.9")], 0, True, "at 192.0.2.9 claims donor w1, whose regis"),
        (
            donor(None, "192.0.2.7"),
            [live("192.0.2.9")],
            0,
            False,
            None,
        ),  # registered address not trusted here
        (donor("10.88.0.5", "192.0.2.7"), [live("192.0.2.9")], 0, False, "overlay address"),  # the overlay is
        # nothing usable recorded: any address passes
        (donor(None, "127.0.0.1"), [live("192.0.2.9")], 0, True, None),
        (donor(None, "testclient"), [live("192.0.2.9")], 0, True, None),
        (donor(None, ""), [live("192.0.2.9")], 0, True, None),
        # a node that advertises no usable address cannot be where a recorded donor is
        (donor("10.88.0.5"), [live("")], 0, True, "at ? claims"),
        # two live claimants: the impostor at another address is named even when it is the second
        (
            donor("10.88.0.5"),
            [live("10.88.0.5"), live("10.88.0.9", "n2")],
            0,
            True,
            "n2n2n2n2n2n2 at 10.88.0.9",
        ),
        (
            donor(None, "127.0.0.1"),
            [live("192.0.2.8"), live("192.0.2.9", "n2")],
            0,
            True,
            "2 live Ray nodes claim donor w1, from different addresses: 192.0.2.8, 192.0.2.9",
        ),
        # two on one address: a restart's dead twin until the grace is over, then flagged
        (donor("10.88.0.5"), [live("10.88.0.5"), live("10.88.0.5", "n2")], 5, True, None),
        (
            donor("10.88.0.5"),
            [live("10.88.0.5"), live("10.88.0.5", "n2")],
            DUPLICATE_GRACE_S,
            True,
            "2 live Ray nodes at 10.88.0.5 have claimed donor w1",
        ),
        (donor(None, ""), [], 0, True, None),
    ],
)
def test_claim_problem(
    w: Worker,
    nodes: list,
    dup_s: float,
    registered: bool,  # type: ignore[type-arg]
    expect: str | None,
) -> None:
    got = claim_problem(w, nodes, dup_s, registered)
    if expect is None:
        assert got is None
    else:
        assert got is not None and expect in got


def test_apply_quarantines_a_stolen_label_and_drains_every_claimant() -> None:
    """`apply` on an in-memory registry (SQLite, no Ray): an impostor with a donor's label at another address
    quarantines the donor, is recorded in the audit log, and both nodes are drained; the grace for two nodes
    on one address runs across passes."""
    from datetime import timedelta
    from types import SimpleNamespace

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from admission.models import AuditEvent, Base

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    state = SimpleNamespace(settings=SimpleNamespace(reconcile_registered_address=True))
    honest, twin = donor("10.88.0.5"), donor("10.88.0.6")
    honest.id, twin.id = "w1", "w2"
    twin.labels = {**twin.labels, "rma.io/node": "w2"}
    for w in (honest, twin):
        w.name, w.node_token_hash = w.id, "x" * 64

    def ray_node(node_id: str, wid: str, ip: str) -> dict:  # type: ignore[type-arg]
        return {
            **node(),
            "node_id": node_id * 28,
            "node_ip": ip,
            "state": "ALIVE",
            "is_head_node": False,
            "labels": {**node()["labels"], "rma.io/node": wid},
            "start_time_ms": 1,
        }

    view = RayView()
    with Session(engine) as s, s.begin():
        s.add_all([honest, twin])
    with Session(engine) as s, s.begin():
        nodes = [
            ray_node("a", "w1", "10.88.0.5"),
            ray_node("b", "w1", "192.0.2.66"),
            ray_node("c", "w2", "10.88.0.6"),
            ray_node("d", "w2", "10.88.0.6"),
        ]
        drained = apply(state, s, nodes, [], view)  # type: ignore[arg-type]
    with Session(engine) as s:
        w1, w2 = s.get(Worker, "w1"), s.get(Worker, "w2")
        assert w1 is not None and w2 is not None
        assert w1.quarantine_reason and "192.0.2.66 claims donor w1" in w1.quarantine_reason
        assert w1.action == "drain"
        assert w2.quarantine_reason is None  # two nodes on its own address: a restart, for now
        events = list(s.scalars(select(AuditEvent)))
        assert [(e.action, e.subject, e.detail["kind"]) for e in events] == [
            ("worker.quarantine", "w1", "claim")
        ]
        assert {n["node_ip"] for n in events[0].detail["nodes"]} == {"10.88.0.5", "192.0.2.66"}
    assert {d[0][0] for d in drained} == {"a", "b"}
    # the same two nodes on w2's address, past the grace: flagged
    view.duplicates_since["w2"] -= timedelta(seconds=DUPLICATE_GRACE_S)
    with Session(engine) as s, s.begin():
        nodes = [ray_node("c", "w2", "10.88.0.6"), ray_node("d", "w2", "10.88.0.6")]
        drained = apply(state, s, nodes, [], view)  # type: ignore[arg-type]
    with Session(engine) as s:
        w2 = s.get(Worker, "w2")
        assert w2 is not None and w2.quarantine_reason and "have claimed donor w2" in w2.quarantine_reason
    assert {d[0][0] for d in drained} == {"c", "d"}
