"""`rma up` on one machine, the embedded default: the Ray head, Serve, the coordinator and the four data stores
on the head (no data donor has joined), each answering real queries and listed by GET /api/admin/stores; `rma down`
stops every store process it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rma_ray.net import local_ip_towards
from tests.support import GiveUp, free_port, kill_left_stores, pool_ports, wait_for

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not shutil.which("redis-server"), reason="Debian redis-server not installed"),
]
STORES = {"redis", "postgres", "chroma", "graph"}


@dataclass
class Up:
    """`rma up` started in the background on its own data dir, HOME and stores dir (its output in `log`)."""

    root: Path
    stores: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes]


def start_up(root: Path, stores: Sequence[str], apps: str) -> Up:
    """`rma up --no-edge` (the single-cluster pool; the edge beside it: tests/integration/test_edge_head.py) of
    `stores` and `apps` on free ports of this machine's address."""
    stores_dir = Path(tempfile.mkdtemp(prefix="rma-it-up-stores-"))
    stores_dir.chmod(0o755)  # the postgres user must traverse it
    ip = local_ip_towards("192.0.2.1")
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "RMA_DATA_DIR": str(root / "data"),
        "RMA_STORES_DIR": str(stores_dir),
        "COLUMNS": "200",
    }
    args = [
        "--node-ip-address",
        ip,
        *pool_ports(ip),
        "--stores",
        ",".join(stores),
        "--apps",
        apps,
        "--no-edge",
        *(a for s in sorted(stores) for a in ("--store-port", f"{s}={free_port(ip, span=2)}")),
    ]
    log = root / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rma_ray.cli", "up", *args],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    return Up(root, stores_dir, env, log, proc)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    up = start_up(tmp_path_factory.mktemp("up"), sorted(STORES), "none")
    root, stores, env, log, proc = up.root, up.stores, up.env, up.log, up.proc
    info: dict[str, Any] = {"log": log, "stores_dir": stores, "env": env}
    try:

        def stores_reported() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise GiveUp(f"rma up exited: {log.read_text()}")
            p = root / "data" / "pool.json"
            if not p.exists() or "stores" not in p.read_text():
                return None
            return json.loads(p.read_text())  # type: ignore[no-any-return]

        info.update(wait_for(stores_reported, timeout=420, interval=1, what="rma up to start the stores"))
        yield info
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", "down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        info["down"] = down
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        kill_left_stores(stores)  # anything `rma down` failed to stop (the test fails)
        shutil.rmtree(stores, ignore_errors=True)


def test_ctrl_c_during_the_start_stops_the_start_and_leaves_nothing_running(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Ctrl-C while `rma up` still starts (the stores and apps take minutes on a cold pool) cuts the start short:
    no "RMA Pool is up", one line that says so, a non-zero exit, and nothing left running: the Ray head, the
    coordinator and the stores started so far are stopped as `rma down` stops them. (Before, the signal waited
    for the whole start; a second Ctrl-C did nothing more, and a `kill -9` then left every process behind.)
    Its own pool, before the module's (no fixture here): the signal comes as the stores start, while the graph
    store (a JVM, seconds) is still coming up and the services app is still to deploy."""
    up = start_up(tmp_path_factory.mktemp("up-interrupted"), ["redis", "graph"], "services")
    root, stores, env, log, proc = up.root, up.stores, up.env, up.log, up.proc
    try:

        def stores_starting() -> bool:
            if proc.poll() is not None:
                raise GiveUp(f"rma up exited: {log.read_text()}")
            return "starting data stores" in log.read_text()

        wait_for(stores_starting, timeout=300, interval=0.2, what="rma up to start the stores")
        info = json.loads((root / "data" / "pool.json").read_text())
        started = [pid for pid in (info["head_pid"], info["coordinator_pid"]) if pid]
        assert len(started) == 2 and all(psutil.pid_exists(p) for p in started)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(300)
        out = log.read_text()
        assert rc != 0, out
        assert "stopped during the start" in out and "pool stopped" in out, out
        assert "RMA Pool is up" not in out, out
        assert "Traceback" not in out, out
        wait_for(
            lambda: not any(psutil.pid_exists(p) for p in started),
            timeout=60,
            what="the head and the coordinator to be gone",
        )
        pids = [json.loads(f.read_text())["pid"] for f in stores.glob("*/.rma-pid.json")]
        wait_for(
            lambda: not any(psutil.pid_exists(p) for p in pids),
            timeout=60,
            what="every store process to stop",
        )
        down = subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", "down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode != 0 and "no pool is running" in down.stdout + down.stderr
    finally:
        if proc.poll() is None:
            subprocess.run(
                [sys.executable, "-m", "rma_ray.cli", "down"], env=env, capture_output=True, timeout=300
            )
            proc.kill()
        kill_left_stores(stores)
        shutil.rmtree(stores, ignore_errors=True)


def test_rma_up_starts_every_store_on_the_head_and_lists_them(pool: dict[str, Any]) -> None:
    assert {s: v["status"] for s, v in pool["stores"].items()} == {s: "ready" for s in STORES}, pool[
        "log"
    ].read_text()[-3000:]
    assert all(v["where"] == "the head" for v in pool["stores"].values())
    out = pool["log"].read_text()
    for s in STORES:
        assert f"{s}: ready on the head" in out
    headers = {"Authorization": f"Bearer {pool['admin_key']}"}

    def listed() -> list[dict[str, Any]] | None:
        rows = httpx.get(pool["coordinator_url"] + "/api/admin/stores", headers=headers, timeout=10).json()
        return rows if {r["name"] for r in rows if r["status"] == "ready"} == STORES else None

    rows = wait_for(listed, timeout=60, what="all four stores listed ready")
    # they reported with the head's service credential (service.json, 0600), not pool.json's admin key
    svc_file = Path(pool["data_dir"]) / "service.json"
    svc = json.loads(svc_file.read_text())
    assert oct(svc_file.stat().st_mode & 0o777) == "0o600" and svc["service_key"].startswith("rma_service_")
    assert pool["admin_key"] not in svc_file.read_text() and svc["service_key"] not in out
    keys = httpx.get(pool["coordinator_url"] + "/api/admin/service-keys", headers=headers, timeout=10).json()
    assert [k["id"] for k in keys if k["revoked_at"] is None] == [svc["key_id"]]
    assert {r["node"] for r in rows} == {"head"} and all(r["size_bytes"] > 0 for r in rows)
    assert {r["runtime"] for r in rows} == {"process"}
    # credentials never leave through the listing or the printed output
    creds = [
        json.loads((pool["stores_dir"] / s / ".rma-credentials.json").read_text())["password"] for s in STORES
    ]
    for pw in creds:
        assert pw not in json.dumps(rows) and pw not in out
    # Chroma has no authentication: it listens on the head's pool address only, never on every address
    chroma = pool["stores"]["chroma"]
    pid = json.loads((pool["stores_dir"] / "chroma" / ".rma-pid.json").read_text())["pid"]
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    listening = {
        (c.laddr.ip, c.laddr.port)
        for p in procs
        for c in p.net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {(chroma["node_ip"], chroma["port"])}, listening
    assert chroma["node_ip"] not in ("0.0.0.0", "::", "127.0.0.1"), chroma
    # the Ray cluster token: 0600 in the data dir, never in `rma up`'s output nor in its logs
    token_file = Path(pool["data_dir"]) / "cluster_token"
    token = token_file.read_text().strip()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) == 64
    logs = [f for f in (Path(pool["data_dir"]) / "logs").rglob("*") if f.is_file()]
    assert any(f.name == "coordinator.log" for f in logs), logs
    assert token not in out
    assert not [f.name for f in logs if token in f.read_text(errors="replace")]


def test_rma_down_stops_every_store(pool: dict[str, Any]) -> None:
    pids = {s: json.loads((pool["stores_dir"] / s / ".rma-pid.json").read_text())["pid"] for s in STORES}
    assert all(psutil.pid_exists(p) for p in pids.values())
    down = subprocess.run(
        [sys.executable, "-m", "rma_ray.cli", "down"],
        env=pool["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    wait_for(
        lambda: not any(psutil.pid_exists(p) for p in pids.values()),
        timeout=60,
        what="every store process to stop",
    )
    # data stays for the next `rma up`
    assert (pool["stores_dir"] / "postgres" / "pgdata" / "PG_VERSION").exists()
