"""The WireGuard overlay across real hosts (network namespaces): donors behind NAT join through the hub, Ray
talks only over it, revocation cuts a donor off at once, and Ray's ports are closed on non-overlay addresses.

Layout (one module-scoped pool, ~4 min): the head is a namespace of its own (`rma up --overlay`: its firewall
and ports are its own, apart from this machine's), A and B are donors behind a NAT, C is a NATed donor whose
Ray advertises its LAN address instead of the overlay's (the control), D is an outsider on the same LAN.

A NAT is modelled as what a home router does to a PC behind it: every new inbound connection arriving on the
uplink (eth0) is dropped; replies and loopback pass. What arrives inside the tunnel is not the router's business.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rma_ray import overlay
from tests.e2e.netns import Host, TestBed, available
from tests.e2e.overlay_bed import (
    COORDINATOR_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    PORTS,
    SERVE_PORT,
    SUBNET,
    Donor,
    NsHelper,
    OverlayPool,
    listening_tcp,
    nat,
    start_pool,
)
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.overlay, pytest.mark.ray]
PROBE_PORT = 47999  # nothing of the pool's listens there
LISTEN = "import signal, socket; s = socket.create_server(('0.0.0.0', %d)); signal.pause()"


@pytest.fixture(scope="module")
def ovpool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayPool]:
    """A head namespace running `rma up --overlay` (~30 s) and 4 more hosts; module-scoped, torn down by PID."""
    reason = available() or overlay.missing_tools()
    if reason:
        pytest.skip(f"overlay e2e unavailable: {reason}")
    with TestBed(5, prefix="rmo") as bed, start_pool(bed, tmp_path_factory.mktemp("ovpool")) as pool:
        yield pool


@pytest.fixture(scope="module")
def nated(ovpool: OverlayPool) -> dict[str, Donor]:
    """Two donors behind NAT, A and B, joined through the overlay, and the control C (below), all started at
    once (~30 s)."""
    a_host, b_host, c_host = ovpool.bed.hosts[1:4]
    for host in (a_host, b_host, c_host):
        nat(host)
    a = ovpool.start_join(a_host, ovpool.invite(tier="service"))
    b = ovpool.start_join(b_host, ovpool.invite(tier="service"))
    c = ovpool.start_join(c_host, ovpool.invite(tier="service"), "--node-ip-address", c_host.ip)
    return {"a": ovpool.wait_joined(a), "b": ovpool.wait_joined(b), "c": c}


def test_nat_donors_join_through_the_overlay_and_advertise_it(
    ovpool: OverlayPool, nated: dict[str, Donor]
) -> None:
    outsider = NsHelper(ovpool.bed.hosts[4])
    try:
        for d in (nated["a"], nated["b"]):
            w = ovpool.worker(d.worker_id)
            node = ovpool.node_of(d.worker_id)
            assert node is not None and w["overlay_ip"] and node["node_ip"] == w["overlay_ip"]
            assert w["overlay_ip"].startswith("10.88.")
            wait_for(
                lambda d=d: ovpool.worker(d.worker_id)["ray_alive"] is True,
                timeout=30,
                what="the reconciler to see the donor's node alive",
            )
            # the NAT is real: a port open on all of the donor's addresses takes connections from the donor's
            # own namespace, none from the LAN (Ray's own ports listen on the overlay address only: no proof)
            listener = d.host.popen([sys.executable, "-c", LISTEN % PROBE_PORT])
            inside = NsHelper(d.host)
            try:
                wait_for(
                    lambda inside=inside, d=d: inside.reachable([(d.host.ip, PROBE_PORT)]),
                    timeout=30,
                    what="the probe listener on the donor",
                )
                assert outsider.reachable([(d.host.ip, PROBE_PORT), (d.host.ip, PORTS.node_manager)]) == set()
            finally:
                inside.close()
                listener.kill()
                listener.wait(10)
            # the private key stayed on the donor, 0600, and never on a command line
            key = d.data_dir / "overlay" / "private.key"
            assert oct(key.stat().st_mode & 0o777) == "0o600"
            secret = key.read_text().strip()
            for pid in d.pids():
                try:
                    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
            assert "joining the pool's overlay" in d.output()
            # `rma status` shows the donor's overlay end and a recent handshake with the hub
            st = d.host.run(
                [sys.executable, "-m", "rma_ray.cli", "status", "--json"],
                check=False,
                env={**os.environ, "RMA_DATA_DIR": str(d.data_dir), "HOME": str(d.data_dir)},
            )
            assert st.returncode == 0, st.stderr
            view = json.loads(st.stdout)["overlay"]
            assert view["address"] == w["overlay_ip"] and view["interface"] == d.interface
            assert view["last_handshake_s"] is not None and view["last_handshake_s"] < 180
    finally:
        outsider.close()


PROBE = """table inet rma_probe {
  chain input { type filter hook input priority -10; policy accept;
    ip saddr %s counter
  }
}
"""


def _counter(host: Host, table: str, chain: str, match: str) -> int:
    """Packets counted by the rule of `chain` that starts with `match` (nft prints counters in the rule)."""
    out = host.run(["nft", "list", "chain", "inet", table, chain]).stdout
    m = re.search(re.escape(match) + r" counter packets (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_the_hub_routes_nothing_between_the_overlay_and_the_heads_lan(
    ovpool: OverlayPool, nated: dict[str, Donor]
) -> None:
    """A donor sends through the tunnel to a LAN host behind the head (the hub forwards on its interface);
    and a LAN host sends to a donor's overlay address through the head, as it could where the head forwards
    on its LAN interface (Docker turns that on machine-wide). The hub's forward chain drops both (its counters
    show the packets reached it); neither end receives a packet."""
    a, lan = nated["a"], ovpool.bed.hosts[4]
    hub_if, head = ovpool.info["overlay"]["interface"], ovpool.head
    a_ip = ovpool.worker(a.worker_id)["overlay_ip"]
    hub_key = a.host.run(["wg", "show", a.interface, "peers"]).stdout.split()[0]
    fwd_key = "net.ipv4.conf.eth0.forwarding"
    fwd_was = head.run(["sysctl", "-n", fwd_key]).stdout.strip()
    from_a, to_a = f'iifname "{hub_if}"', f'oifname "{hub_if}"'
    a_probe, lan_probe = NsHelper(a.host), NsHelper(lan)
    try:
        lan.run(["nft", "-f", "-"], input=PROBE % "10.88.0.0/16")
        a.host.run(["nft", "-f", "-"], input=PROBE % lan.ip)
        # A routes the LAN host into its tunnel, and its peer (the hub) accepts that destination
        a.host.run(["wg", "set", a.interface, "peer", hub_key, "allowed-ips", f"{SUBNET},{lan.ip}/32"])
        a.host.run(["ip", "route", "add", f"{lan.ip}/32", "dev", a.interface])
        before = _counter(head, overlay.NFT_TABLE, "forward", from_a)
        assert a_probe.reachable([(lan.ip, 22), (lan.ip, 8000)], timeout=0.5) == set()
        assert _counter(head, overlay.NFT_TABLE, "forward", from_a) > before  # reached the hub, dropped there
        assert _counter(lan, "rma_probe", "input", "ip saddr 10.88.0.0/16") == 0
        # the other way, with the head forwarding on its LAN interface too
        head.run(["sysctl", "-w", f"{fwd_key}=1"])
        lan.run(["ip", "route", "add", SUBNET, "via", head.ip])
        before = _counter(head, overlay.NFT_TABLE, "forward", to_a)
        assert lan_probe.reachable([(a_ip, PORTS.node_manager)], timeout=0.5) == set()
        assert _counter(head, overlay.NFT_TABLE, "forward", to_a) > before
        assert _counter(a.host, "rma_probe", "input", f"ip saddr {lan.ip}") == 0
        # spoke to spoke still goes through the hub: the head reaches A, and A's Ray stays alive
        assert ovpool.head_helper.reachable([(a_ip, PORTS.node_manager)]) == {(a_ip, PORTS.node_manager)}
    finally:
        a_probe.close()
        lan_probe.close()
        head.run(["sysctl", "-w", f"{fwd_key}={fwd_was or 0}"], check=False)
        lan.run(["ip", "route", "del", SUBNET], check=False)
        a.host.run(["ip", "route", "del", f"{lan.ip}/32"], check=False)
        a.host.run(["wg", "set", a.interface, "peer", hub_key, "allowed-ips", SUBNET], check=False)
        for h in (lan, a.host):
            h.run(["nft", "delete", "table", "inet", "rma_probe"], check=False)


def test_without_the_overlay_a_nat_donor_is_declared_dead(
    ovpool: OverlayPool, nated: dict[str, Donor]
) -> None:
    """The control: the same kind of donor, its Ray advertising its LAN address, is unreachable for the head."""
    c = nated["c"]

    def registered() -> str | None:
        m = c.data_dir / "membership.json"
        return json.loads(m.read_text())["worker_id"] if m.exists() else None

    c.worker_id = wait_for(registered, timeout=120, interval=0.5, what="the control donor to register")
    dead = wait_for(
        lambda: ovpool.node_of(c.worker_id, "DEAD"),
        timeout=120,
        interval=1,
        what="Ray to declare the LAN-advertising NAT donor dead",
    )
    assert dead["node_ip"] == c.host.ip
    c.proc.send_signal(signal.SIGTERM)
    c.proc.wait(60)
    assert c.pids() == []


SERVE_APPS = """
import ray, time
from ray import serve
ray.init(address="auto", namespace="rma", logging_level="ERROR")

def here():
    ctx = ray.get_runtime_context()
    return {{"node": ctx.get_node_labels().get("rma.io/node"), "ip": ray.util.get_node_ip_address()}}

@serve.deployment(ray_actor_options={{"num_cpus": 0.1, "label_selector": {{"rma.io/node": "{b}"}}}})
class Back:
    def __call__(self, payload):
        return {{"back": here(), "echo": len(payload)}}

@serve.deployment(ray_actor_options={{"num_cpus": 0.1, "label_selector": {{"rma.io/node": "{a}"}}}})
class Front:
    def __init__(self, back):
        self.back = back
    async def __call__(self, request):
        got = await self.back.remote(b"x" * 100_000)  # A -> B, through the hub
        return {{"front": here(), **got}}

@serve.deployment(num_replicas=2, max_ongoing_requests=32,
                  ray_actor_options={{"num_cpus": 0.4, "label_selector": {{"rma.io/tier": "service"}}}})
class Where:
    def __call__(self, request):
        return here()

serve._run(Front.bind(Back.bind()), name="chain", route_prefix="/chain", _blocking=False)
serve._run(Where.bind(), name="where", route_prefix="/where", _blocking=False)
deadline = time.time() + 180
while time.time() < deadline:
    apps = serve.status().applications
    if all(n in apps and apps[n].status == "RUNNING" for n in ("chain", "where")):
        break
    time.sleep(0.5)
print("status", {{n: str(a.status) for n, a in serve.status().applications.items()}})
"""


def serve_get(pool: OverlayPool, path: str) -> dict[str, Any]:
    r = httpx.get(f"{pool.info['serve_url']}/{path}", timeout=10)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def apps(ovpool: OverlayPool, nated: dict[str, Donor]) -> Iterator[None]:
    """`chain` (front on A calling back on B) and `where` (2 replicas on the service tier); deleted after."""
    r = ovpool.driver(SERVE_APPS.format(a=nated["a"].worker_id, b=nated["b"].worker_id))
    assert r.returncode == 0 and "RUNNING" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    yield
    # both at once, waited for together: each app's ingress replica stays reachable for 30 s once deleted (Ray's
    # HAProxy mode), so one after the other took a minute
    ovpool.driver(
        "import ray; from deployments.gateway.deploy import delete_apps; "
        'ray.init(address="auto", namespace="rma"); delete_apps(("chain", "where"), timeout_s=90)',
        timeout=120,
    )


def test_serve_request_across_two_nat_donors_goes_through_the_hub(
    ovpool: OverlayPool, nated: dict[str, Donor], apps: None
) -> None:
    got = serve_get(ovpool, "chain")
    a, b = ovpool.worker(nated["a"].worker_id), ovpool.worker(nated["b"].worker_id)
    assert got["front"] == {"node": a["id"], "ip": a["overlay_ip"]}
    assert got["back"] == {"node": b["id"], "ip": b["overlay_ip"]} and got["echo"] == 100_000
    seen: set[str] = set()
    wait_for(
        lambda: seen.add(serve_get(ovpool, "where")["node"]) or len(seen) == 2,
        timeout=60,
        what="the two replicas of `where` to answer from both NAT donors",
    )


def test_ray_ports_are_closed_off_the_overlay(
    ovpool: OverlayPool, nated: dict[str, Donor], apps: None
) -> None:
    outsider = NsHelper(ovpool.bed.hosts[4])
    try:
        for d in (nated["a"], nated["b"]):
            ports = listening_tcp(d.host)
            assert {PORTS.node_manager, PORTS.object_manager} <= ports, ports
            if d is nated["a"]:  # `chain`'s front: an ingress replica's direct-ingress port in Serve's range
                lo, hi = overlay.SERVE_INGRESS_HTTP_PORTS
                assert any(lo <= p <= hi for p in ports), ports
            # nothing of Ray answers on the donor's LAN address, even without its NAT
            d.host.run(["nft", "delete", "table", "inet", "rma_nat"])
            try:
                targets = [(d.host.ip, p) for p in sorted(ports)]
                # Serve's direct-ingress ports are firewalled from the start (overlay.serve_ingress_env): a
                # replica that started since the agent's last pass answers on none of them
                pinned = overlay._ports_in(PORTS.firewalled(serve=True))
                assert not {p for _, p in outsider.reachable(targets)} & pinned
                # a port a Ray process opened at random since then (a Serve replica opens one beside its
                # ingress port) is covered on the agent's next pass, a heartbeat later (`Agent.guard_ports`;
                # SECURITY.md: "covered within one agent loop, not at once")
                wait_for(
                    lambda targets=targets: outsider.reachable(targets) == set(),
                    timeout=30,
                    interval=1,
                    what=f"no Ray port of {d.host.ip} to answer on its LAN address",
                )
            finally:
                nat(d.host)
            # ... and the head reaches all of them over the overlay
            ip = ovpool.worker(d.worker_id)["overlay_ip"]
            over = ovpool.head_helper.reachable([(ip, p) for p in sorted(ports)], timeout=2)
            assert over == {(ip, p) for p in ports}
        head_ports = listening_tcp(ovpool.head)
        assert {GCS_PORT, DASHBOARD_PORT, PORTS.node_manager, COORDINATOR_PORT, SERVE_PORT} <= head_ports
        open_on_lan = {p for _, p in outsider.reachable([(ovpool.head.ip, p) for p in sorted(head_ports)])}
        assert open_on_lan == {COORDINATOR_PORT, SERVE_PORT}, open_on_lan
        # the hub's UDP port is what donors dial
        assert (
            f":{ovpool.info['overlay']['endpoint'].rsplit(':', 1)[1]} "
            in ovpool.head.run(["ss", "-lunH"]).stdout
        )
    finally:
        outsider.close()


def test_revoke_cuts_the_donor_off_and_the_other_keeps_serving(
    ovpool: OverlayPool, nated: dict[str, Donor], apps: None
) -> None:
    a, b = nated["a"], nated["b"]
    b_ip = ovpool.worker(b.worker_id)["overlay_ip"]
    b_key = b.host.run(["wg", "show", b.interface, "public-key"]).stdout.strip()
    target = [(b_ip, PORTS.node_manager)]
    assert ovpool.head_helper.reachable(target) == set(target)
    ok, failed, stop = [0], [0], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.get(f"{ovpool.info['serve_url']}/where")
                    (ok if r.status_code == 200 else failed)[0] += 1
                except httpx.HTTPError:
                    failed[0] += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: ok[0] > 20, timeout=30, what="load to flow")
        r = ovpool.admin("POST", f"/api/admin/workers/{b.worker_id}/revoke")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        revoked_at = time.monotonic()
        # overlay traffic to it stops within 1 s: no new connection gets through the hub
        wait_for(
            lambda: ovpool.head_helper.reachable(target, timeout=0.2) == set(),
            timeout=1,
            interval=0.05,
            what="the revoked donor's overlay traffic to stop",
        )
        hub_peers = ovpool.head.run(["wg", "show", ovpool.info["overlay"]["interface"], "peers"]).stdout
        assert b_key and b_key not in hub_peers
        # Ray declares it dead within 10 s (the head's fast health checks)
        wait_for(
            lambda: ovpool.node_of(b.worker_id, "DEAD"),
            timeout=max(0.1, 10 - (time.monotonic() - revoked_at)),
            interval=0.2,
            what="Ray to mark the revoked node dead",
        )
        # the revoked donor's agent stops its own Ray processes, takes its interface down, and exits
        wait_for(lambda: b.proc.poll() is not None, timeout=60, what="the revoked donor's agent to exit")
        assert "revoked by the pool admin" in b.output()
        wait_for(lambda: b.pids() == [], timeout=30, what="no process left on the revoked donor")
        assert b.host.run(["ip", "link", "show", b.interface], check=False).returncode != 0
        # the other donor keeps serving, and serves everything
        served = ok[0]
        wait_for(lambda: ok[0] > served + 50, timeout=60, what="requests served after the revocation")
        wait_for(
            lambda: all(serve_get(ovpool, "where")["node"] == a.worker_id for _ in range(10)),
            timeout=60,
            what="every `where` replica on the remaining donor",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert failed[0] <= max(10, 0.05 * ok[0]), f"{failed[0]} failed of {ok[0] + failed[0]}"
    # rejoining with the old key is refused, even with a fresh invite
    r = httpx.post(
        ovpool.url + "/api/worker/register",
        timeout=30,
        headers={"Authorization": f"Bearer {ovpool.invite(tier='service')}"},
        json={
            "name": "again",
            "overlay": {"public_key": b_key},
            "capabilities": {"cpu_cores": 2, "ram_mb": 16000, "disk_free_gb": 50},
        },
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "overlay_key_revoked", r.text


def test_nat_donor_stays_alive_and_serving_for_two_minutes(
    ovpool: OverlayPool, nated: dict[str, Donor], apps: None
) -> None:
    """Checked all along, not slept through: the same Ray node stays alive and answers, for 120 s after it
    joined (the tests above ran inside that window)."""
    a = nated["a"]
    while True:
        # the node it joined with, not whatever node it has now: a restart would pass a check against the latter
        node = ovpool.node_of(a.worker_id)
        assert node is not None and node["node_id"] == a.ray_node_id, "the NAT donor's Ray node was replaced"
        assert ovpool.worker(a.worker_id)["status"] == "healthy"
        assert serve_get(ovpool, "where")["node"] == a.worker_id
        if time.monotonic() - a.joined_at >= 120:
            break
        time.sleep(2)
    assert a.proc.poll() is None, "the donor's agent exited"
