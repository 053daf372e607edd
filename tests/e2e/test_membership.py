"""Pool membership on Ray across real hosts (network namespaces): `rma up`, `rma join`, tier labels, the
reconciler (quarantine, offline), revocation, and leaving. One session-scoped pool; each test that breaks a
donor brings its own."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from rma_ray.client import AdmissionClient, AdmissionError
from tests.conftest import FIXTURES
from tests.e2e.conftest import PoolUnderTest
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

WHERE_APP = """
import ray, time
from ray import serve
ray.init(address="auto", namespace="rma", logging_level="ERROR")

@serve.deployment(num_replicas={replicas}, max_ongoing_requests=32,
                  ray_actor_options={{"num_cpus": 0.1, "label_selector": {{"rma.io/tier": "{tier}"}}}})
class Where:
    def __call__(self, request):
        ctx = ray.get_runtime_context()
        return {{"node_id": ctx.get_node_id(), "labels": ctx.get_node_labels()}}

serve._run(Where.bind(), name="{name}", route_prefix="/{name}", _blocking=False)  # returns before RUNNING
deadline = time.time() + {wait}
while {wait} and time.time() < deadline:
    st = serve.status().applications["{name}"].status
    if st == "RUNNING":
        break
    time.sleep(0.5)
st = serve.status().applications["{name}"].status
print("status", getattr(st, "value", st))
"""


def deploy(pool: PoolUnderTest, name: str, tier: str, replicas: int = 1, wait: int = 120) -> str:
    r = pool.driver(WHERE_APP.format(name=name, tier=tier, replicas=replicas, wait=wait))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().split()[-1]


def where(pool: PoolUnderTest, name: str) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"{pool.info['serve_url']}/{name}", timeout=10)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def members(pool: PoolUnderTest) -> dict[str, object]:
    """A service donor, a trusted data donor (both pinned by invite), and a donor lying about an H200."""
    service = pool.join(pool.invite(tier="service"))
    data = pool.join(pool.invite(tier="data", trusted=True))
    liar = pool.join(pool.invite(), "--capabilities-file", str(FIXTURES / "h200-16cpu-128g.json"))
    return {"service": service, "data": data, "liar": liar}


def test_donors_join_with_tier_labels(pool: PoolUnderTest, members: dict) -> None:  # type: ignore[type-arg]
    service, data = members["service"], members["data"]
    nodes = {n["labels"].get("rma.io/node"): n for n in pool.alive_nodes()}
    assert nodes[service.worker_id]["labels"]["rma.io/tier"] == "service"
    assert nodes[service.worker_id]["labels"]["rma.io/trusted"] == "false"
    assert nodes[service.worker_id]["node_ip"] == service.host.ip
    assert nodes[data.worker_id]["labels"]["rma.io/tier"] == "data"
    assert nodes[data.worker_id]["labels"]["rma.io/trusted"] == "true"
    assert nodes[data.worker_id]["node_ip"] == data.host.ip
    for d in (service, data):
        w = pool.worker(d.worker_id)
        assert (
            w["status"] == "healthy"
            and w["ray_alive"] is True
            and w["ray_node_id"] == nodes[d.worker_id]["node_id"]
        )
    # `rma status` on the donor shows its membership as the registry sees it
    import os
    import sys

    st = service.host.run(
        [sys.executable, "-m", "rma_ray.cli", "status", "--json"],
        check=False,
        env={**os.environ, "RMA_DATA_DIR": str(service.data_dir), "HOME": str(service.data_dir)},
    )
    assert st.returncode == 0, st.stderr
    view = json.loads(st.stdout)
    assert view["worker_id"] == service.worker_id and view["registry_status"] == "healthy"
    assert view["agent_running"] and view["ray_node_running"] and view["tier"] == "service"
    # the cluster token reached the donor as a 0600 file, never on a command line
    token_file = service.data_dir / "cluster_token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text().strip()
    for pid in service.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert token not in cmdline


def test_lying_donor_is_quarantined(pool: PoolUnderTest, members: dict) -> None:  # type: ignore[type-arg]
    liar = members["liar"]
    reg = pool.admin("GET", "/api/admin/audit", params={"action": "worker.register"}).json()
    assert any(e["subject"] == liar.worker_id and e["detail"]["tier"] == "gpu" for e in reg)

    def quarantined() -> dict | None:  # type: ignore[type-arg]
        w = pool.worker(liar.worker_id)
        return w if w["status"] == "quarantined" else None

    w = wait_for(quarantined, timeout=30, what="the reconciler to quarantine the donor that claimed an H200")
    assert "0 GPUs" in w["quarantine_reason"] and w["action"] == "drain"
    # the agent hears "drain" on its next heartbeat
    wait_for(lambda: "draining" in liar.output(), timeout=20, what="the lying donor's agent to drain")


def test_serve_deployment_lands_on_its_tier(pool: PoolUnderTest, members: dict) -> None:  # type: ignore[type-arg]
    assert deploy(pool, "where-service", "service") == "RUNNING"
    seen = where(pool, "where-service")
    assert seen["labels"]["rma.io/tier"] == "service"
    assert seen["labels"]["rma.io/node"] == members["service"].worker_id
    assert deploy(pool, "where-data", "data") == "RUNNING"
    assert where(pool, "where-data")["labels"]["rma.io/node"] == members["data"].worker_id


def test_pending_replicas_become_demand(pool: PoolUnderTest, members: dict) -> None:  # type: ignore[type-arg]
    # no honest GPU donor is in the pool: a gpu-tier replica waits, and shows as gpu demand
    deploy(pool, "where-gpu", "gpu", wait=0)
    wait_for(
        lambda: pool.admin("GET", "/api/admin/stats").json()["tiers"]["gpu"]["demand"] >= 1,
        timeout=30,
        what="gpu demand to be reported",
    )
    r = pool.driver(
        'import ray; from ray import serve; ray.init(address="auto", namespace="rma"); '
        'serve.delete("where-gpu")'
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wait_for(
        lambda: pool.admin("GET", "/api/admin/stats").json()["tiers"]["gpu"]["demand"] == 0,
        timeout=30,
        what="gpu demand to clear",
    )


def _rma_join(pool: PoolUnderTest, token: str) -> subprocess.CompletedProcess[str]:
    host = pool.free_hosts[0]  # not consumed: a refused join starts nothing
    d = pool.root / f"refused-{time.monotonic_ns()}"
    return host.run(
        [__import__("sys").executable, "-m", "rma_ray.cli", "join", pool.url],
        check=False,
        timeout=60,
        env={
            **__import__("os").environ,
            "RMA_JOIN_TOKEN": token,
            "RMA_DATA_DIR": str(d),
            "HOME": str(d),
            "COLUMNS": "200",
        },
    )


def test_bad_tokens_are_refused_and_start_nothing(pool: PoolUnderTest, members: dict) -> None:  # type: ignore[type-arg]
    before = len(pool.alive_nodes())
    used = pool.invite()
    assert _rma_join(pool, "rma_join_nonsense").returncode == 1
    # use up a token through the API, then present it again
    httpx.post(
        pool.url + "/api/worker/register",
        headers={"Authorization": f"Bearer {used}"},
        json={"name": "x", "capabilities": {"cpu_cores": 4, "ram_mb": 16000, "disk_free_gb": 100}},
    )
    revoked = pool.invite()
    inv_id = revoked.split("_")[2]
    pool.admin("POST", f"/api/invites/{inv_id}/revoke")
    expired = pool.invite(ttl_s=10)
    expiry = datetime.now(UTC) + timedelta(seconds=11)
    cases = {
        "rma_join_" + "0" * 12 + "_" + "0" * 64: "unknown join token",
        used: "already used",
        revoked: "was revoked",
    }
    for token, message in cases.items():
        r = _rma_join(pool, token)
        assert r.returncode == 1, r.stdout
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    wait_for(lambda: datetime.now(UTC) > expiry, timeout=20, what="the invite to expire")
    r = _rma_join(pool, expired)
    assert r.returncode == 1 and "expired at" in r.stderr
    r = _rma_join(pool, "garbage")
    assert r.returncode == 1 and "not an RMA join credential" in r.stderr
    assert len(pool.alive_nodes()) == before


def test_sigkill_and_sigstop_go_offline_within_10s(pool: PoolUnderTest) -> None:
    killed = pool.join(pool.invite(tier="service"))
    stopped = pool.join(pool.invite(tier="service"))
    t0 = time.monotonic()
    for pid in killed.pids():
        subprocess.run(["kill", "-KILL", str(pid)], check=False)
    for pid in stopped.pids():
        subprocess.run(["kill", "-STOP", str(pid)], check=False)
    try:
        wait_for(
            lambda: pool.worker(killed.worker_id)["status"] == "offline",
            timeout=10,
            what="SIGKILLed donor offline",
        )
        wait_for(
            lambda: pool.worker(stopped.worker_id)["status"] == "offline",
            timeout=max(1, 10 - (time.monotonic() - t0)),
            what="SIGSTOPped donor offline",
        )
    finally:
        for pid in stopped.pids():
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
            subprocess.run(["kill", "-CONT", str(pid)], check=False)


def test_revoke_under_load_keeps_serving(pool: PoolUnderTest, members: dict) -> None:  # type: ignore[type-arg]
    second = pool.join(pool.invite(tier="service"))
    node_token = json.loads((second.data_dir / "membership.json").read_text())["node_token"]
    assert deploy(pool, "where-load", "service", replicas=2) == "RUNNING"
    nodes = set()
    wait_for(
        lambda: nodes.add(where(pool, "where-load")["labels"]["rma.io/node"]) or len(nodes) == 2,
        timeout=30,
        what="replicas on both service donors",
    )
    ok, failed, stop = [0], [0], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.get(f"{pool.info['serve_url']}/where-load")
                    (ok if r.status_code == 200 else failed)[0] += 1
                except httpx.HTTPError:
                    failed[0] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: ok[0] > 20, timeout=30, what="load to flow")
        r = pool.admin("POST", f"/api/admin/workers/{second.worker_id}/revoke")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        revoked_at = ok[0]
        # its agent hears 401 worker_revoked, stops its Ray node and exits
        wait_for(lambda: second.proc.poll() is not None, timeout=60, what="the revoked donor's agent to exit")
        assert "revoked by the pool admin" in second.output()
        wait_for(
            lambda: not any(n["labels"].get("rma.io/node") == second.worker_id for n in pool.alive_nodes()),
            timeout=30,
            what="the revoked node to leave Ray",
        )
        wait_for(lambda: ok[0] > revoked_at + 50, timeout=60, what="requests served after the revocation")
        # every replica now runs on the remaining service donor
        for _ in range(10):
            assert where(pool, "where-load")["labels"]["rma.io/node"] == members["service"].worker_id
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert failed[0] <= max(5, 0.05 * ok[0]), f"{failed[0]} failed of {ok[0] + failed[0]}"
    assert second.pids() == [], "the revoked donor left processes behind"
    # the agent forgot its membership, and the credential it held is dead at the coordinator
    assert not (second.data_dir / "membership.json").exists()
    with AdmissionClient(pool.url) as coordinator, pytest.raises(AdmissionError) as refused:
        coordinator.heartbeat(node_token)
    assert (refused.value.status, refused.value.code) == (401, "worker_revoked"), refused.value


# The redis supervisor, pinned to one donor, with the store's GCS records cleared first and after: the pool is
# shared, and test_stores_e2e (before or after this module) pins its own redis to its own data donor.
FORGET_REDIS = """
    try:
        a = ray.get_actor("rma-store-redis", namespace="rma")
        ray.kill(a, no_restart=True)
    except ValueError:
        pass
    for key in (supervisor.pin_key("redis"), supervisor.args_key("redis")):
        internal_kv._internal_kv_del(key, namespace=supervisor.NAMESPACE)
"""
REDIS_ON = """
import json, ray
from ray.experimental import internal_kv
from deployments.stores import supervisor
ray.init(logging_level="ERROR", log_to_driver=False)
%s
supervisor.ensure("redis", selector={**supervisor.TRUSTED_DATA, "rma.io/node": %%r})
print(json.dumps(supervisor.endpoint("redis", 240).__dict__))
""" % textwrap.dedent(FORGET_REDIS)
FORGET = """
import ray
from ray.experimental import internal_kv
from deployments.stores import supervisor
ray.init(logging_level="ERROR", log_to_driver=False)
""" + textwrap.dedent(FORGET_REDIS)


def test_revoking_a_data_donor_stops_its_node_and_store_and_keeps_the_data(pool: PoolUnderTest) -> None:
    """SECURITY.md: a revoked data donor's node stops, and with it the store; the data stays on its disk. A
    trusted data donor joined by `rma join` hosts redis (process runtime) with a key written; the admin revokes it:
    its agent stops the Ray node and exits, the redis process is gone, and the volume on the donor's disk still
    holds the key, which redis-server serves again when started on that directory; the registry stops showing
    the store ready. ~40 s (up to 30 s of it the registry's staleness window)."""
    import psutil
    import redis

    from deployments.stores.kinds import KINDS, credentials
    from deployments.stores.runtime import ProcessRuntime
    from tests.support import free_port

    stores_dir = Path(tempfile.mkdtemp(prefix="rma-e2e-revoke-"))
    donor = pool.join(pool.invite(tier="data", trusted=True), env={"RMA_STORES_DIR": str(stores_dir)})
    volume = stores_dir / "redis"
    again: ProcessRuntime | None = None
    try:
        r = pool.driver(REDIS_ON % donor.worker_id, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        ep = json.loads(r.stdout.strip().splitlines()[-1])
        assert ep["host"] == donor.host.ip
        with redis.Redis(host=ep["host"], port=ep["port"], password=ep["password"], socket_timeout=10) as db:
            assert db.set("rma:revoked-donor", "kept on its disk")
        # acknowledged and in the append-only file (fsynced each second): on the donor's disk before the revoke
        wait_for(
            lambda: any(
                b"kept on its disk" in f.read_bytes() for f in (volume / "appendonlydir").glob("*.aof")
            ),
            timeout=30,
            what="the key in redis's append-only file",
        )
        store_pid = json.loads((volume / ".rma-pid.json").read_text())["pid"]
        assert store_pid in donor.pids()  # the store runs on the donor's host
        ray_node = pool.worker(donor.worker_id)["ray_node_id"]
        assert ray_node

        r = pool.admin("POST", f"/api/admin/workers/{donor.worker_id}/revoke")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        wait_for(lambda: donor.proc.poll() is not None, timeout=60, what="the revoked donor's agent to exit")
        assert "revoked by the pool admin" in donor.output()
        wait_for(
            lambda: all(n["node_id"] != ray_node for n in pool.alive_nodes()),
            timeout=30,
            what="the revoked donor's Ray node to leave Ray",
        )
        wait_for(
            lambda: (
                not psutil.pid_exists(store_pid) or psutil.Process(store_pid).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=30,
            what="the store's redis-server to stop",
        )
        assert donor.pids() == [], "the revoked donor left processes behind"

        # the data stays on the donor's disk: its files, and the key when redis-server is started on them again
        assert (volume / ".rma-credentials.json").exists()
        assert any(b"kept on its disk" in f.read_bytes() for f in (volume / "appendonlydir").glob("*.aof"))
        again = ProcessRuntime(KINDS["redis"], volume, "127.0.0.1", free_port(), credentials(volume))
        again.start()
        local = redis.Redis(host="127.0.0.1", port=again.port, password=credentials(volume)["password"])
        with local:

            def read_back() -> bytes | None:
                try:
                    return local.get("rma:revoked-donor")  # type: ignore[return-value]
                except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError):
                    return None

            assert (
                wait_for(read_back, timeout=30, what="redis-server on the kept volume") == b"kept on its disk"
            )
        # the registry stops showing it ready (its reports ended with the node), so a supervisor of this store on
        # another donor (test_stores_e2e's, on the same pool) takes its row: a row reported within
        # STALE_AFTER_S (30 s) is refused to anyone else
        wait_for(
            lambda: all(
                r["status"] != "ready"
                for r in pool.admin("GET", "/api/admin/stores").json()
                if r["name"] == "redis" and r["node"] == donor.worker_id
            ),
            timeout=60,
            interval=2,
            what="the registry to stop showing the revoked donor's redis ready",
        )
    finally:
        if again is not None:
            again.stop()
        pool.driver(FORGET, timeout=120)
        for pidfile in stores_dir.glob("*/.rma-pid.json"):
            try:
                psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
            except (psutil.Error, OSError, ValueError):
                pass
        shutil.rmtree(stores_dir, ignore_errors=True)


def test_agent_restarts_its_ray_node_when_it_dies(pool: PoolUnderTest) -> None:
    import psutil

    donor = pool.join(pool.invite(tier="service"))
    old_node = pool.worker(donor.worker_id)["ray_node_id"]
    raylets = [p for p in map(psutil.Process, donor.pids()) if p.name() == "raylet"]
    assert len(raylets) == 1
    raylets[0].kill()
    wait_for(
        lambda: any(
            n["labels"].get("rma.io/node") == donor.worker_id and n["node_id"] != old_node
            for n in pool.alive_nodes()
        ),
        timeout=90,
        interval=1,
        what="the agent to bring up a new Ray node for the same donor",
    )
    wait_for(lambda: pool.worker(donor.worker_id)["status"] == "healthy", timeout=30, what="healthy again")
    assert "restarting" in donor.output()
    assert donor.proc.poll() is None


def test_ctrl_c_drains_unregisters_and_leaves_nothing(pool: PoolUnderTest) -> None:
    donor = pool.join(pool.invite(tier="service"))
    donor.proc.send_signal(signal.SIGINT)
    donor.proc.wait(60)
    assert donor.proc.returncode == 0, donor.output()
    assert pool.worker(donor.worker_id)["status"] == "left"
    assert donor.pids() == []
    assert not (donor.data_dir / "membership.json").exists()
    wait_for(
        lambda: not any(n["labels"].get("rma.io/node") == donor.worker_id for n in pool.alive_nodes()),
        timeout=30,
        what="the node to leave Ray",
    )


def test_rotate_cluster_token_readmits_live_donors_and_locks_out_the_old_token(
    pool: PoolUnderTest, members: dict
) -> None:  # type: ignore[type-arg]
    import os
    import sys

    service = members["service"]
    old = pool.root / "old_cluster_token"
    old.write_text((pool.root / "head" / "cluster_token").read_text())
    old.chmod(0o600)
    r = subprocess.run(
        [sys.executable, "-m", "rma_ray.cli", "rotate-cluster-token", "--data-dir", str(pool.root / "head")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    assert (pool.root / "head" / "cluster_token").read_text() != old.read_text()
    # the live donor hears of the rotation in a heartbeat reply, fetches the new token and rejoins
    wait_for(
        lambda: any(n["labels"].get("rma.io/node") == service.worker_id for n in pool.alive_nodes()),
        timeout=120,
        interval=1,
        what="the live donor to rejoin the rotated cluster",
    )
    wait_for(lambda: pool.worker(service.worker_id)["status"] == "healthy", timeout=30, what="healthy again")
    assert "rejoining the new cluster" in service.output()
    # someone holding only the old token (a revoked donor) is refused by the new head
    host = pool.free_hosts[0]
    out = host.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--address",
            pool.info["ray_address"],
            "--node-ip-address",
            host.ip,
            "--temp-dir",
            f"/tmp/rma-old-{host.name[-6:]}",
            "--block",
        ],
        check=False,
        timeout=120,
        env={
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(old),
            "HOME": str(pool.root / "oldhome"),
        },
    )
    assert out.returncode != 0
    assert "InvalidAuthToken" in out.stdout + out.stderr
