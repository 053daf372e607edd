"""The multi-host pool: `rma up` on the head (the root namespace, on the test bridge) and `rma join` from
donor namespaces, each a host with its own address. Real Ray, real processes, real network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.netns import Host, TestBed, available
from tests.support import GiveUp, wait_for

PY = sys.executable
N_HOSTS = 17  # 15 used by the modules today (the impostor test takes a host of its own)


@dataclass
class Donor:
    host: Host
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    worker_id: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.host.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def power_cut(self, victims: list[int]) -> None:
        """SIGKILL `victims` (this host's processes, `pids()`) at once, as a power cut would, and wait until
        every one is gone."""
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        wait_for(
            lambda: (
                not any(
                    psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                    for p in victims
                )
            ),
            timeout=20,
            what="every process of the donor's host to be gone",
        )


@dataclass
class PoolUnderTest:
    bed: TestBed
    info: dict[str, Any]
    root: Path
    proc: subprocess.Popen[bytes]
    free_hosts: list[Host] = field(default_factory=list)
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

    def ray_nodes(self) -> list[dict[str, Any]]:
        token = (self.root / "head" / "cluster_token").read_text().strip()
        r = httpx.get(
            self.info["ray_dashboard_url"] + "/api/v0/nodes",
            params={"detail": "true"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        return r.json()["data"]["result"]["result"]  # type: ignore[no-any-return]

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.ray_nodes() if n["state"] == "ALIVE"]

    def start_join(self, token: str, *args: str, env: dict[str, str] | None = None) -> Donor:
        host = self.free_hosts.pop(0)
        d = self.root / host.name
        d.mkdir(parents=True, exist_ok=True)
        log = d / "join.log"
        env = {
            **os.environ,
            "HOME": str(d / "home"),
            "RMA_DATA_DIR": str(d / "data"),
            "RMA_JOIN_TOKEN": token,
            "COLUMNS": "200",
            **(env or {}),
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

    def join(self, token: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Donor:
        """Join and wait until the registry shows the donor healthy on a live Ray node."""
        donor = self.start_join(token, *args, env=env)

        def joined() -> str | None:
            if donor.proc.poll() is not None:
                raise GiveUp(f"rma join exited: {donor.output()}")
            m = donor.data_dir / "membership.json"
            if not m.exists():
                return None
            wid = json.loads(m.read_text())["worker_id"]
            w = self.worker(wid)
            return wid if w["status"] in ("healthy", "quarantined") and w["ray_node_id"] else None

        donor.worker_id = wait_for(
            joined, timeout=timeout, interval=0.5, what=f"donor on {donor.host.name} to join"
        )
        return donor

    def restart(self, donor: Donor, *args: str, env: dict[str, str] | None = None) -> Donor:
        """`rma join` again on the donor's host and data dir (its saved membership), as systemd's Restart= or a
        reboot would: the returned Donor is the new process, same worker id."""
        log = donor.log.with_name(f"rejoin-{len(self.donors)}.log")
        env = {
            **os.environ,
            "HOME": str(donor.data_dir.parent / "home"),
            "RMA_DATA_DIR": str(donor.data_dir),
            "COLUMNS": "200",
            **(env or {}),
        }
        proc = donor.host.popen(
            [PY, "-m", "rma_ray.cli", "join", self.url, "--cpus", "1", "--drain-deadline", "10", *args],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        again = Donor(donor.host, proc, donor.data_dir, log, donor.worker_id)
        self.donors.append(again)
        return again

    def driver(self, script: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """Run a Ray driver on the head (token auth from the pool's cluster token)."""
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "head" / "cluster_token"),
            "RAY_ADDRESS": self.info["ray_address"],
            "HOME": str(self.root / "hhome"),
        }
        return subprocess.run(
            [PY, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="package")  # torn down when tests/e2e is done: no idle pool through the other suites
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolUnderTest]:
    """A bed of N_HOSTS donor hosts and `rma up` on the head (~15 s to start); session-scoped, torn down by PID."""
    reason = available()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    root = tmp_path_factory.mktemp("pool")
    with TestBed(N_HOSTS) as bed:
        env = {
            **os.environ,
            "HOME": str(root / "hhome"),
            "RMA_DATA_DIR": str(root / "head"),
            "COLUMNS": "200",
        }
        log = root / "up.log"
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "rma_ray.cli",
                "up",
                "--node-ip-address",
                bed.head_ip,
                "--heartbeat-interval",
                "2",
                "--stores",
                "none",
                "--apps",
                "none",
                "--no-edge",  # today's single-cluster pool (tests/e2e/test_edge.py runs its own, with the edge)
            ],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        try:

            def ready() -> dict[str, Any] | None:
                if proc.poll() is not None:
                    raise GiveUp(f"rma up exited: {log.read_text()}")
                p = root / "head" / "pool.json"
                return json.loads(p.read_text()) if p.exists() and "join_token" in p.read_text() else None

            info = wait_for(ready, timeout=240, interval=0.5, what="rma up to write pool.json")
            put = PoolUnderTest(bed, info, root, proc, free_hosts=list(bed.hosts))
            yield put
        finally:
            # donors first (each leaves cleanly), then the head (`rma down` shuts Serve and Ray down)
            donors = put.donors if "put" in locals() else []
            live = [d for d in donors if d.proc.poll() is None]
            for d in live:
                d.proc.send_signal(signal.SIGINT)  # a leave (SIGTERM keeps membership)
            for d in live:
                try:
                    d.proc.wait(30)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
            for d in donors:  # Ray's temp dirs of donors a test killed (a clean leave removes its own)
                if d.worker_id:
                    shutil.rmtree(f"/tmp/rma-{d.worker_id}", ignore_errors=True)
            down = subprocess.run(
                [PY, "-m", "rma_ray.cli", "down"], env=env, capture_output=True, text=True, timeout=150
            )
            if down.returncode != 0:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
