"""The edge cluster on the overlay across real hosts (network namespaces): an untrusted donor behind NAT joins
its edge through the edge's own hub, sees only edge nodes, cannot open a TCP connection to any of the core's
Ray ports on any address of the head (not even with its tunnel forced to carry the core's subnet), reaches its
edge head, and is cut off by a revoke.

Layout (one module-scoped pool, ~2 min): the head is a namespace of its own (`rma up --overlay`, edge on, no
stores, no apps), A is an untrusted donor behind a NAT (tests/e2e/overlay_bed.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rma_ray import overlay
from rma_ray.edges import CORE, DEFAULT_EDGE, LABEL_CLUSTER, EdgePorts
from tests.e2e.netns import TestBed, available
from tests.e2e.overlay_bed import (
    COORDINATOR_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    HUB,
    PORTS,
    PY,
    SERVE_PORT,
    SUBNET,
    Donor,
    NsHelper,
    OverlayPool,
    nat,
    start_pool,
)
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.overlay, pytest.mark.ray]
EDGE = EdgePorts()
EDGE_SUBNET, EDGE_HUB = "10.89.0.0/16", "10.89.0.1"


@pytest.fixture(scope="module")
def edgepool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayPool]:
    """A head namespace running `rma up --overlay` with its edge (~40 s) and one more host; module-scoped."""
    reason = available() or overlay.missing_tools()
    if reason:
        pytest.skip(f"overlay e2e unavailable: {reason}")
    with (
        TestBed(2, prefix="rmeo") as bed,
        start_pool(bed, tmp_path_factory.mktemp("edgeovl"), edge=True) as pool,
    ):
        yield pool


@pytest.fixture(scope="module")
def donor(edgepool: OverlayPool) -> Donor:
    """An untrusted donor behind NAT, joined into the edge through the edge's hub (~20 s)."""
    host = edgepool.bed.hosts[1]
    nat(host)
    return edgepool.wait_joined(edgepool.start_join(host, edgepool.invite(tier="service")))


def edge_of(pool: OverlayPool) -> dict[str, str]:
    info = json.loads((pool.root / "head" / "pool.json").read_text())
    return dict(info["edges"][DEFAULT_EDGE])


def hub_peers(pool: OverlayPool, interface: str) -> str:
    return pool.head.run(["wg", "show", interface, "peers"]).stdout


def root_listening_tcp(pool: OverlayPool) -> set[int]:
    """TCP ports that root's processes listen on in the head's namespace, off loopback (`ss -ltnp`)."""
    ports = set()
    for line in pool.head.run(["ss", "-ltnpH"]).stdout.splitlines():
        fields = line.split()
        addr, port = fields[3].rsplit(":", 1)
        pids = [int(m) for m in re.findall(r"pid=(\d+)", line)]
        if addr.startswith(("127.", "[::1]")) or not pids:
            continue
        try:
            if all(psutil.Process(pid).uids().real == 0 for pid in pids):
                ports.add(int(port))
        except psutil.Error:
            continue
    return ports


def test_the_edge_donor_joins_its_edge_over_the_edges_own_hub(edgepool: OverlayPool, donor: Donor) -> None:
    edge = edge_of(edgepool)
    assert edge["ray_address"] == f"{EDGE_HUB}:{EDGE.gcs}"  # the edge head binds its hub's address
    w = edgepool.worker(donor.worker_id)
    assert w["cluster"] == DEFAULT_EDGE and w["overlay_ip"].startswith("10.89.")
    key = donor.host.run(["wg", "show", donor.interface, "public-key"]).stdout.strip()
    edge_if = overlay.edge_interface(edgepool.info["overlay"]["interface"], DEFAULT_EDGE)
    assert key and key in hub_peers(edgepool, edge_if)
    assert key not in hub_peers(edgepool, edgepool.info["overlay"]["interface"])  # never the core's hub
    # the donor's tunnel: the edge's hub only, its subnet only
    dump = overlay.parse_dump(donor.host.run(["wg", "show", donor.interface, "dump"]).stdout)
    assert [p.allowed_ips for p in dump] == [[EDGE_SUBNET]]
    assert dump[0].endpoint and dump[0].endpoint.endswith(f":{51821}")
    # what Ray shows to the edge's token, asked from the donor over its tunnel: edge nodes only
    helper = NsHelper(donor.host)
    try:
        nodes = helper.call(
            op="nodes",
            url=edge["dashboard_url"] + "/api/v0/nodes",
            token_file=str(Path(edge["data_dir"]) / "cluster_token"),
        )
    finally:
        helper.close()
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert {n["labels"].get(LABEL_CLUSTER) for n in alive} == {DEFAULT_EDGE}
    assert {n["node_ip"] for n in alive} == {EDGE_HUB, w["overlay_ip"]}
    assert not any(n["labels"].get(LABEL_CLUSTER) == CORE or n["node_ip"] == HUB for n in nodes)


LISTEN = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(64)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "while True: s.accept()[0].close()\n"
)
PROBE = (
    "import json, socket, sys\n"
    "def ok(h, p):\n"
    "    try:\n"
    "        socket.create_connection((h, p), timeout=2).close(); return True\n"
    "    except OSError:\n"
    "        return False\n"
    "print(json.dumps([ok(h, p) for h, p in json.loads(sys.argv[1])]))\n"
)


@contextlib.contextmanager
def core_listener(pool: OverlayPool) -> Iterator[int]:
    """A throwaway TCP listener on the core hub's address in the head's namespace, on a free port no table
    names: only the rules about the core's subnet keep anyone from it."""
    proc = pool.head.popen([PY, "-c", LISTEN, HUB], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(5)


def no_core_counter(pool: OverlayPool) -> int:
    """Packets the edge table's `ip daddr <core subnet> counter drop` rule dropped so far."""
    text = pool.head.run(["nft", "list", "table", "inet", overlay.edge_table(DEFAULT_EDGE)]).stdout
    m = re.search(rf"ip daddr {re.escape(SUBNET)} counter packets (\d+)", text)
    assert m, text
    return int(m.group(1))


def test_the_edge_donor_cannot_open_any_core_ray_port(edgepool: OverlayPool, donor: Donor) -> None:
    # every port the core's processes (root's: the edge head runs as its own user) listen on, pinned or
    # picked at random by Ray, but the two public ones; and every pinned one besides
    core = root_listening_tcp(edgepool) - {COORDINATOR_PORT, SERVE_PORT}
    assert {GCS_PORT, DASHBOARD_PORT, PORTS.node_manager, PORTS.object_manager} <= core, core
    core |= {PORTS.ray_client, PORTS.runtime_env_agent, PORTS.dashboard_agent_grpc, PORTS.min_worker}
    addresses = [edgepool.head.ip, HUB, EDGE_HUB]  # the head's LAN (veth), the core's hub, the edge's hub
    targets = [(a, p) for a in addresses for p in sorted(core)]
    helper = NsHelper(donor.host)
    try:
        assert helper.reachable([(EDGE_HUB, EDGE.gcs)], timeout=2) == {(EDGE_HUB, EDGE.gcs)}
        assert helper.reachable(targets) == set()
        # a hostile donor forces its tunnel to carry the core's subnet too: the edge hub's table drops it
        hub_key = edgepool.head.run(
            [
                "wg",
                "show",
                overlay.edge_interface(edgepool.info["overlay"]["interface"], DEFAULT_EDGE),
                "public-key",
            ]
        ).stdout.strip()
        donor.host.run(
            ["wg", "set", donor.interface, "peer", hub_key, "allowed-ips", f"{EDGE_SUBNET},{SUBNET}"]
        )
        donor.host.run(["ip", "route", "replace", SUBNET, "dev", donor.interface])
        try:
            with core_listener(edgepool) as port:
                # the head reaches the listener; the forced donor does not, and the edge table's rule drops it
                assert edgepool.head_helper.reachable([(HUB, port)], timeout=2) == {(HUB, port)}
                before = no_core_counter(edgepool)
                core_ports = sorted(core | {COORDINATOR_PORT, SERVE_PORT, port})
                assert helper.reachable([(HUB, p) for p in core_ports]) == set()
                assert no_core_counter(edgepool) > before
        finally:
            donor.host.run(["ip", "route", "del", SUBNET, "dev", donor.interface])
            donor.host.run(["wg", "set", donor.interface, "peer", hub_key, "allowed-ips", EDGE_SUBNET])
        assert helper.reachable([(EDGE_HUB, EDGE.gcs)], timeout=2) == {(EDGE_HUB, EDGE.gcs)}
    finally:
        helper.close()
    # ... while the core (loopback on the head) reaches the edge's Serve and dashboard
    near = edgepool.head_helper.reachable([(HUB, EDGE.serve), (EDGE_HUB, EDGE.dashboard)], timeout=2)
    assert near == {(HUB, EDGE.serve), (EDGE_HUB, EDGE.dashboard)}


def test_revoke_takes_the_edge_donor_off_its_hub_at_once(edgepool: OverlayPool, donor: Donor) -> None:
    ip = edgepool.worker(donor.worker_id)["overlay_ip"]
    key = donor.host.run(["wg", "show", donor.interface, "public-key"]).stdout.strip()
    edge_if = overlay.edge_interface(edgepool.info["overlay"]["interface"], DEFAULT_EDGE)
    target = [(ip, PORTS.node_manager)]
    assert edgepool.head_helper.reachable(target, timeout=2) == set(target)
    r = edgepool.admin("POST", f"/api/admin/workers/{donor.worker_id}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert key not in hub_peers(edgepool, edge_if)  # before the admin's request returned
    wait_for(
        lambda: edgepool.head_helper.reachable(target, timeout=0.2) == set(),
        timeout=2,
        interval=0.05,
        what="the revoked edge donor's tunnel to carry nothing",
    )


def test_edge_user_code_on_the_head_reaches_its_edge_but_no_core_port(edgepool: OverlayPool) -> None:
    """Code an edge donor runs on the edge head runs as the edge's system user there: the core table's output
    chain keeps it off the core's Ray ports and subnet on every address, loopback included."""
    user = edge_of(edgepool).get("user") or "rma-edge"
    with core_listener(edgepool) as port:
        targets = [
            [EDGE_HUB, EDGE.gcs],  # its own GCS
            [edgepool.head.ip, COORDINATOR_PORT],  # the coordinator (its ingress fetches the public keys)
            [HUB, GCS_PORT],  # the core's GCS
            [HUB, port],  # anything on the core's subnet
        ]
        probe = ["runuser", "-u", user, "--", PY, "-c", PROBE, json.dumps(targets)]
        assert json.loads(edgepool.head.run(probe).stdout) == [True, True, False, False]
        # root (the core) still reaches both
        assert edgepool.head_helper.reachable([(HUB, GCS_PORT), (HUB, port)], timeout=2) == {
            (HUB, GCS_PORT),
            (HUB, port),
        }
