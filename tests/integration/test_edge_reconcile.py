"""The reconciler per cluster, against real Ray: a core head and an edge head, each with its own token, and a
coordinator wired to both (`RMA_EDGES`). A donor admitted into the edge starts its Ray node there with the
labels and token the coordinator gave it: the reconciler sees it alive through the edge's own dashboard and
token. A node in the edge that claims a core donor's id is an intruder of the edge, and is drained through the
edge (its own address and token). The edge's Serve status is read from its real dashboard.

Module-scoped: two heads (~20 s each on a quiet 2-core box) and up to two worker nodes; run under the lock."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from admission.main import build_state, create_app, prepare_database
from admission.state import AppState
from rma_ray.edges import LABEL_CLUSTER, EdgeEndpoint
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.integration.conftest import CPU_BOX, Coordinator, make_settings
from tests.support import ServerThread, free_port, wait_for

pytestmark = pytest.mark.ray

GIB = 1024**3


@dataclass
class Heads:
    coordinator: Coordinator
    ip: str
    root: Path
    edge_address: str
    edge_token: Path
    nodes: list[RayNode]

    def worker(self, name: str, labels: dict[str, str]) -> RayNode:
        """A worker node joining the edge with the edge's token (a donor, or someone holding its token)."""
        node = RayNode(
            NodeSpec(
                node_ip=self.ip,
                token_file=self.edge_token,
                head=False,
                address=self.edge_address,
                temp_dir=short_temp_dir(f"re-{name}-{os.getpid()}"),
                labels=labels,
                num_cpus=1,
                memory_bytes=GIB,
                drain_timeout_s=2,
                extra_args=["--object-store-memory", str(200 * 1024 * 1024)],
            ),
            self.root / f"{name}.log",
        )
        self.nodes.append(node)
        node.start()
        node.wait_started(180)
        return node


def _head(
    root: Path, ip: str, name: str, token: Path, labels: dict[str, str], cpus: int
) -> tuple[RayNode, int]:
    gcs, dash = free_port(ip), free_port(ip)
    node = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"re-{name}-{os.getpid()}"),
            labels=labels,
            gcs_port=gcs,
            dashboard_port=dash,
            num_cpus=cpus,
            drain_timeout_s=2,
        ),
        root / f"{name}-head.log",
    )
    node.start()
    return node, dash


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Heads]:
    root = tmp_path_factory.mktemp("edgerec")
    ip = local_ip_towards("192.0.2.1")
    core_token, edge_token = root / "core_token", root / "edge_token"
    read_or_create_secret(core_token)
    read_or_create_secret(edge_token)
    nodes: list[RayNode] = []
    state: AppState | None = None
    server = None
    try:
        core, core_dash = _head(
            root, ip, "core", core_token, {"rma.io/tier": "head", LABEL_CLUSTER: "core"}, 1
        )
        nodes.append(core)
        edge, edge_dash = _head(
            root,
            ip,
            "edge",
            edge_token,
            {"rma.io/tier": "head", "rma.io/trusted": "false", LABEL_CLUSTER: "edge"},
            0,
        )
        nodes.append(edge)
        core.wait_started(180)
        edge.wait_started(180)
        endpoint = EdgeEndpoint(
            name="edge",
            ray_address=f"{ip}:{edge.spec.gcs_port}",
            dashboard_url=f"http://{ip}:{edge_dash}",
            serve_url=f"http://{ip}:9",
            token_file=edge_token,
        )
        state = build_state(
            make_settings(
                f"sqlite:///{root / 'coordinator.db'}",
                root / "coord",
                ray_address=f"{ip}:{core.spec.gcs_port}",
                ray_auth_token_file=core_token,
                ray_dashboard_url=f"http://{ip}:{core_dash}",
                edges=[endpoint],
                admit_without_ray=False,
                reconcile_interval_s=1,
                metrics_interval_s=60,
            )
        )
        admin_key = prepare_database(state)
        assert admin_key
        server = ServerThread(create_app(state=state)).__enter__()
        http = httpx.Client(base_url=server.url, timeout=30)
        yield Heads(
            Coordinator(server.url, admin_key, state, http), ip, root, endpoint.ray_address, edge_token, nodes
        )
        http.close()
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        for node in reversed(nodes):  # a discarded cluster, head last, as `rma down` stops one
            node.stop_all(grace=5)
            shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
        if state is not None:
            state.engine.dispose()


def _worker(c: Coordinator, wid: str) -> dict[str, Any]:
    return c.admin("GET", f"/api/admin/workers/{wid}").json()  # type: ignore[no-any-return]


def test_an_edge_donor_is_seen_through_its_edge_and_an_impostor_there_is_an_intruder(heads: Heads) -> None:
    c = heads.coordinator
    donor = c.join(CPU_BOX)  # untrusted: into the edge, with the edge's address and token
    assert donor["cluster"] == "edge" and donor["ray"]["address"] == heads.edge_address
    assert donor["ray"]["auth_token"] == heads.edge_token.read_text().strip()
    heads.worker("donor", donor["labels"])
    seen = wait_for(
        lambda: (w := _worker(c, donor["worker_id"]))["ray_alive"] and w,
        timeout=60,
        what="the reconciler to see the edge donor's node alive through the edge's dashboard",
    )
    assert seen["cluster"] == "edge" and seen["quarantine_reason"] is None and seen["ray_node_id"]
    views = c.state.reconciler.views
    assert set(views) == {"core", "edge"} and views["edge"].error is None and views["core"].error is None
    assert views["core"].nodes_alive == 1  # the core head alone: the edge's nodes are not the core's

    # someone with the edge's token starts a node claiming a core donor: an intruder of the edge, drained there
    core_donor = c.join(CPU_BOX, trusted=True)
    labels = {**core_donor["labels"]}
    impostor = heads.worker("impostor", labels)
    intruder = wait_for(
        lambda: next(
            (i for i in views["edge"].intruders if "belongs to cluster 'core'" in i["reason"]), None
        ),
        timeout=60,
        what="the edge's reconciler to flag the node claiming a core donor",
    )
    assert intruder["node_id"] == impostor.raylet_node_id() or intruder["node_id"]
    wait_for(
        lambda: intruder["node_id"] in views["edge"].drained,
        timeout=90,
        what="the impostor's node to be drained through the edge",
    )
    audit = c.admin("GET", "/api/admin/audit", params={"action": "ray.intruder"}).json()
    assert any(a["detail"].get("cluster") == "edge" for a in audit)
    assert _worker(c, core_donor["worker_id"])["quarantine_reason"] is None  # the core donor did nothing


def test_edge_routes_read_the_edges_real_serve_status(heads: Heads) -> None:
    c = heads.coordinator
    service = c.admin("POST", "/api/admin/service-keys", json={"name": "head"}).json()["key"]
    r = c.http.post("/api/service/edge-routes", headers={"Authorization": f"Bearer {service}"})
    assert r.status_code == 200, r.text
    (edge,) = r.json()["edges"]
    assert edge["name"] == "edge" and edge["healthy"] is True and edge["apps"] == {}  # no Serve app there yet


def test_admin_ray_view_per_cluster(heads: Heads) -> None:
    c = heads.coordinator
    core = c.admin("GET", "/api/admin/ray").json()
    edge = c.admin("GET", "/api/admin/ray", params={"cluster": "edge"}).json()
    assert core["wired"] and edge["wired"] and core["error"] is None and edge["error"] is None
    assert c.admin("GET", "/api/admin/ray", params={"cluster": "north"}).json()["wired"] is False
