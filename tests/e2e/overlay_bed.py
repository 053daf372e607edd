"""A pool whose head is a network namespace of its own (so its firewall and ports are apart from this
machine's), for the overlay e2e tests and bench/overlay.py: `rma up [--overlay]` on the head host, `rma join`
from the others, and a long-lived probe inside a namespace."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rma_ray import overlay
from tests.e2e.netns import Host, TestBed
from tests.support import wait_for

PY = sys.executable
SUBNET = "10.88.0.0/16"
HUB = "10.88.0.1"
PORTS = overlay.RayPorts()
COORDINATOR_PORT, SERVE_PORT, GCS_PORT, DASHBOARD_PORT = 8470, 8000, 6380, 8265

NAT = """table inet rma_nat {
  chain input { type filter hook input priority 0; policy accept;
    iifname "eth0" ct state new drop
  }
}
"""

# A long-lived helper inside a namespace: answers JSON requests on stdin, so probes from that host cost
# milliseconds, not a Python start-up each.
HELPER = r"""
import json, socket, sys, concurrent.futures, httpx
def connect(target, timeout):
    try:
        with socket.create_connection((target[0], target[1]), timeout=timeout):
            return True
    except OSError:
        return False
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "connect":
            with concurrent.futures.ThreadPoolExecutor(64) as ex:
                ok = list(ex.map(lambda t: connect(t, req["timeout"]), req["targets"]))
            out = [t for t, good in zip(req["targets"], ok) if good]
        elif req["op"] == "nodes":
            r = httpx.get(req["url"], params={"detail": "true"}, timeout=5,
                          headers={"Authorization": "Bearer " + open(req["token_file"]).read().strip()})
            out = [{"node_id": n["node_id"], "state": n["state"], "node_ip": n["node_ip"],
                    "labels": n.get("labels", {})} for n in r.json()["data"]["result"]["result"]]
        else:
            out = None
        print(json.dumps({"ok": out}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
"""


class NsHelper:
    def __init__(self, host: Host) -> None:
        self.proc = host.popen(
            [PY, "-u", "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.lock = threading.Lock()

    def call(self, **req: Any) -> Any:
        with self.lock:
            assert self.proc.stdin and self.proc.stdout
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def reachable(self, targets: list[tuple[str, int]], timeout: float = 0.5) -> set[tuple[str, int]]:
        return {
            tuple(t) for t in self.call(op="connect", targets=[list(t) for t in targets], timeout=timeout)
        }  # type: ignore[misc]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Donor:
    host: Host
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    worker_id: str = ""
    joined_at: float = 0.0
    ray_node_id: str = ""  # the Ray node it joined with (a restarted node gets a new id)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.host.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    @property
    def interface(self) -> str:
        return overlay.interface_name(self.worker_id)


@dataclass
class OverlayPool:
    bed: TestBed
    head: Host
    root: Path
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    head_helper: NsHelper
    donors: list[Donor] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.info["coordinator_url"]  # type: ignore[no-any-return]

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.url + path,
            headers={"Authorization": f"Bearer {self.info['admin_key']}"},
            timeout=30,
            **kw,
        )

    def invite(self, **fields: Any) -> str:
        r = self.admin("POST", "/api/invites", json=fields)
        assert r.status_code == 201, r.text
        return r.json()["token"]  # type: ignore[no-any-return]

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self.admin("GET", f"/api/admin/workers/{worker_id}").json()  # type: ignore[no-any-return]

    def nodes(self) -> list[dict[str, Any]]:
        return self.head_helper.call(
            op="nodes",
            url=self.info["ray_dashboard_url"] + "/api/v0/nodes",  # type: ignore[no-any-return]
            token_file=str(self.root / "head" / "cluster_token"),
        )

    def node_of(self, worker_id: str, state: str = "ALIVE") -> dict[str, Any] | None:
        return next(
            (n for n in self.nodes() if n["labels"].get("rma.io/node") == worker_id and n["state"] == state),
            None,
        )

    def start_join(self, host: Host, token: str, *args: str) -> Donor:
        d = self.root / host.name
        d.mkdir(parents=True, exist_ok=True)
        log = d / "join.log"
        env = {
            **os.environ,
            "HOME": str(d / "home"),
            "RMA_DATA_DIR": str(d / "data"),
            "RMA_JOIN_TOKEN": token,
            "COLUMNS": "200",
        }
        proc = host.popen(
            [PY, "-m", "rma_ray.cli", "join", self.url, "--cpus", "1", "--drain-deadline", "10", *args],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        donor = Donor(host, proc, d / "data", log)
        self.donors.append(donor)
        return donor

    def wait_joined(self, donor: Donor, timeout: float = 180) -> Donor:
        def joined() -> str | None:
            if donor.proc.poll() is not None:
                return "exited"  # an assert here would only be retried by wait_for until its timeout
            m = donor.data_dir / "membership.json"
            if not m.exists():
                return None
            wid = json.loads(m.read_text())["worker_id"]
            w = self.worker(wid)
            return wid if w["status"] == "healthy" and w["ray_node_id"] else None

        donor.worker_id = wait_for(
            joined, timeout=timeout, interval=0.5, what=f"donor on {donor.host.name} to join"
        )
        assert donor.worker_id != "exited", f"rma join exited: {donor.output()[-3000:]}"
        donor.joined_at = time.monotonic()
        donor.ray_node_id = self.worker(donor.worker_id)["ray_node_id"]
        return donor

    def driver(self, script: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "head" / "cluster_token"),
            "RAY_ADDRESS": self.info["ray_address"],
            "HOME": str(self.root / "hhome"),
        }
        return self.head.run([PY, "-c", textwrap.dedent(script)], check=False, env=env, timeout=timeout)


def nat(host: Host) -> None:
    host.run(["nft", "-f", "-"], input=NAT)


def listening_tcp(host: Host) -> set[int]:
    """Every TCP port something listens on in the namespace, on an address other than loopback."""
    out = host.run(["ss", "-ltnH"]).stdout
    ports = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, port = local.rsplit(":", 1)
        if not addr.startswith(("127.", "[::1]")):
            ports.add(int(port))
    return ports


@contextlib.contextmanager
def start_pool(
    bed: TestBed, root: Path, use_overlay: bool = True, edge: bool = False
) -> Iterator[OverlayPool]:
    """`rma up` in bed.hosts[0] (~30 s); donors leave and the pool goes down by PID afterwards. `edge`: with
    the edge cluster (its own hub on the overlay; untrusted donors join it); pool.json is ready once the edge
    head runs."""
    head = bed.hosts[0]
    hub_if = f"rmah{bed.id}"
    env = {**os.environ, "HOME": str(root / "hhome"), "RMA_DATA_DIR": str(root / "head"), "COLUMNS": "200"}
    log = root / "up.log"
    argv = [
        PY,
        "-m",
        "rma_ray.cli",
        "up",
        "--node-ip-address",
        head.ip,
        "--heartbeat-interval",
        "2",
        "--stores",
        "none",
        "--apps",
        "none",
    ]
    if not edge:
        argv.append("--no-edge")  # the single-cluster pool: untrusted donors join the core
    if use_overlay:
        argv += ["--overlay", "--overlay-interface", hub_if]
    proc = head.popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    helper = NsHelper(head)
    pool = None
    try:

        def ready() -> dict[str, Any] | None:
            assert proc.poll() is None, f"rma up exited: {log.read_text()}"
            p = root / "head" / "pool.json"
            info = json.loads(p.read_text()) if p.exists() and "join_token" in p.read_text() else None
            if info and edge:
                e = (info.get("edges") or {}).get("edge") or {}
                assert not e.get("error"), f"the edge did not start: {e['error']}"
                return info if e.get("head_pid") else None
            return info

        info = wait_for(ready, timeout=240, interval=0.5, what="rma up to write pool.json")
        pool = OverlayPool(bed, head, root, proc, info, helper)
        yield pool
    finally:
        donors = pool.donors if pool else []
        live = [d for d in donors if d.proc.poll() is None]
        for d in live:
            d.proc.send_signal(signal.SIGINT)  # a leave (SIGTERM keeps membership)
        for d in live:
            try:
                d.proc.wait(40)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        helper.close()
        try:
            head.run([PY, "-m", "rma_ray.cli", "down"], check=False, env=env, timeout=200)
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # the bed's teardown kills whatever is left in the namespace
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for d in donors:  # what a killed donor could not clean: Ray's temp dir, wireguard-go's socket
            if d.worker_id:
                subprocess.run(
                    [
                        "rm",
                        "-rf",
                        f"/tmp/rma-{d.worker_id}",
                        str(overlay.WG_SOCKET_DIR / f"{d.interface}.sock"),
                    ],
                    check=False,
                )
        (overlay.WG_SOCKET_DIR / f"{hub_if}.sock").unlink(missing_ok=True)
        if edge:
            (overlay.WG_SOCKET_DIR / f"{overlay.edge_interface(hub_if, 'edge')}.sock").unlink(missing_ok=True)
