"""`rma up` with an edge cluster (issue 17): the edge head runs as its own system user with its own token and
ports, code on it reads nothing of the core's, its token rotates alone, it comes back when it dies, and `rma down`
leaves no process of either head, nor the edge guard's table (which `rma up` put in place of a crashed run's).

One pool for the module, started with `rma up`'s Python API (Pool.up in this process, its supervisor in a
thread): the core head, Serve, the coordinator and one edge head with Serve; no stores, no apps (~60 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rma_ray import poolinfo
from rma_ray.edges import LABEL_CLUSTER, EdgePorts, EdgeSpec
from rma_ray.head import Pool, UpError, UpOptions, signal_rotate
from rma_ray.net import local_ip_towards
from rma_ray.overlay import edge_guard_table
from rma_ray.raynode import ray_env
from tests.support import free_port, wait_for

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(os.geteuid() != 0, reason="an edge head runs as its own system user: needs root"),
]
EDGE = "edge"

# A driver as a hostile edge donor would run one: a task on the edge (num_cpus=0: the edge head's only
# resources) that reports its user and tries to read the given files; and the nodes it sees.
PROBE = r"""
import json, os, pwd, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
def probe(paths):
    read = {}
    for p in paths:
        try:
            open(p).read()
            read[p] = "read"
        except OSError as exc:
            read[p] = type(exc).__name__
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "read": read}

out = ray.get(probe.remote(sys.argv[2:]), timeout=120)
out["nodes"] = [n["Labels"] for n in ray.nodes() if n["Alive"]]
print("PROBE " + json.dumps(out))
"""


# a tiny Serve app on the core (its replica ids show whether a rotation of the edge redeployed the core)
TINY_APP = r"""
import sys
import ray
from ray import serve
ray.init(address=sys.argv[1], namespace="rma", logging_level="ERROR", log_to_driver=False)

@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Tiny:
    def __call__(self, request):
        return "tiny"

serve.run(Tiny.bind(), name="tiny", route_prefix="/tiny")
"""


def driver(
    address: str, token_file: Path, *paths: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, address, *paths],
        env=ray_env(token_file, {"RAY_gcs_rpc_server_connect_timeout_s": "10"}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def probe_result(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE ") :])  # type: ignore[no-any-return]


def refused(r: subprocess.CompletedProcess[str]) -> bool:
    """The driver failed for its token (not for anything else)."""
    said = r.stdout + r.stderr
    ok = r.returncode != 0 and "PROBE " not in r.stdout and re.search(r"(?i)auth|token", said) is not None
    assert ok, said[-3000:]
    return ok


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("edge")
    ip = local_ip_towards("192.0.2.1")
    ports = EdgePorts(
        **{
            k: free_port(ip)
            for k in (
                "gcs",
                "dashboard",
                "serve",
                "node_manager",
                "object_manager",
                "metrics_export",
                "dashboard_agent_grpc",
                "runtime_env_agent",
                "dashboard_agent_listen",
                "ray_client",
            )
        }
    )
    opts = UpOptions(
        data_dir=root / "data",
        node_ip=ip,
        coordinator_host=ip,
        coordinator_port=free_port(ip),
        gcs_port=free_port(ip),
        dashboard_port=free_port(ip),
        serve_port=free_port(ip),
        stores=(),
        apps=(),
        edges=(EdgeSpec(name=EDGE, ports=ports),),
    )
    # what a crashed run of this pool (its data dir) left: its edge guard's table, which `rma up` replaces
    table = edge_guard_table(opts.data_dir)
    stale = f"table inet {table} {{\n  set stale {{ type inet_service; elements = {{ 1 }} }}\n}}\n"
    if shutil.which("nft"):
        subprocess.run(["nft", "-f", "-"], input=stale, text=True, check=True, timeout=20)
    said: list[str] = []
    p = Pool(opts, said.append)
    p.said = said  # type: ignore[attr-defined]
    old_hup = signal.signal(signal.SIGHUP, lambda *_: p.rotate_event.set())  # what `rma up` installs
    supervisor = threading.Thread(target=p.supervise, daemon=True)
    try:
        try:
            p.up()
        except UpError as exc:
            if "cannot run the pool's code" in str(exc):
                pytest.skip(str(exc))  # the install is not readable by the edge user (a venv under /root)
            raise
        # `rma up` returns once the core's apps run; the edge head, its Serve and its apps start after them,
        # in a thread of their own (Pool.up), which the tests here wait for
        edge = p.edges[EDGE]
        assert edge.restarting is not None
        edge.restarting.join(300)
        assert not edge.restarting.is_alive(), "the edge head did not start within 300 s"
        assert edge.error is None, edge.error
        supervisor.start()
        p.supervisor = supervisor  # type: ignore[attr-defined]
        yield p
    finally:
        p.stop_event.set()
        if supervisor.is_alive():
            supervisor.join(120)
        p.down()
        if shutil.which("nft"):  # the stale table, where the test failed before `rma up` replaced it
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=20)
        signal.signal(signal.SIGHUP, old_hup)
        print("\n".join(said))  # what `rma up` said, for a failure's report


def edge_info(pool: Pool) -> poolinfo.EdgeInfo:
    info = poolinfo.read(pool.o.data_dir)
    assert info.edges and EDGE in info.edges, info
    return info.edges[EDGE]


def test_the_edge_head_runs_as_its_own_user_and_reads_nothing_of_the_core(pool: Pool) -> None:
    edge = pool.edges[EDGE]
    info = edge_info(pool)
    assert info.user == "rma-edge" and info.head_pid and info.ray_address == edge.ray_address
    # every process of the edge head (ray start, GCS, raylet, dashboard) runs as rma-edge
    procs = [psutil.Process(info.head_pid), *psutil.Process(info.head_pid).children(recursive=True)]
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet"} <= names, names
    assert {p.username() for p in procs} == {"rma-edge"}
    # its data dir root's 0755 (the edge user cannot put a link where root reads the token), the token
    # root:edge 0640, its home the edge user's 0700; the core's 0700 and 0600, root's
    d, tok = Path(info.data_dir), Path(info.data_dir) / "cluster_token"
    pw = edge._user()
    for path, mode, owner in ((d, 0o755, (0, 0)), (tok, 0o640, (0, pw.pw_gid)), (d / "home", 0o700, None)):
        st = path.lstat()
        want = owner or (pw.pw_uid, pw.pw_gid)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, *want), path
    # the core head's Ray temp dir (made 0777 by Ray) lies under a 0700 parent of root's
    core_temp = pool.head.spec.temp_dir.parent  # type: ignore[union-attr]
    assert stat.S_IMODE(core_temp.stat().st_mode) == 0o700 and core_temp.stat().st_uid == 0
    core = pool.o.data_dir
    secrets_ = [core / "pool.json", core / "cluster_token", core / "service.json"]
    assert stat.S_IMODE(core.stat().st_mode) == 0o700 and core.stat().st_uid == 0
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_uid == 0 for f in secrets_)
    # the coordinator holds no edge token, and the edge head's env holds no core secret
    env = psutil.Process(info.head_pid).environ()
    assert not [k for k in env if k.startswith("RMA_")] and env["RAY_AUTH_TOKEN_PATH"] == str(tok)
    assert env["HOME"] == str(Path(info.data_dir) / "home")

    # a task submitted to the edge with its token runs as rma-edge and cannot read the core's secrets
    out = probe_result(driver(edge.ray_address, tok, *map(str, secrets_)))
    assert out["user"] == "rma-edge"
    assert out["read"] == {str(f): "PermissionError" for f in secrets_}
    # the edge sees only itself: the edge head (tier head, untrusted, cluster edge)
    assert [(n.get(LABEL_CLUSTER), n.get("rma.io/trusted")) for n in out["nodes"]] == [(EDGE, "false")]
    # the edge token opens nothing of the core
    assert refused(driver(pool.o.gcs_address, tok, timeout=240))


def test_rotating_the_edge_token_leaves_the_core_untouched(pool: Pool) -> None:
    edge = pool.edges[EDGE]
    core_head, coordinator = pool.head.pid, pool.coordinator.pid  # type: ignore[union-attr]
    tiny = subprocess.run(
        [sys.executable, "-c", TINY_APP, pool.o.gcs_address],
        env=ray_env(pool.token_file),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert tiny.returncode == 0, tiny.stderr[-3000:]
    core_serve = serve_actors(pool.dashboard_url, pool.token_file)
    assert core_serve["replicas"], core_serve
    old_token = edge.token_file.read_text()
    before = edge_info(pool)

    print(signal_rotate(pool.o.data_dir, edge=EDGE, timeout=300))

    after = edge_info(pool)
    assert after.token_rotated_at != before.token_rotated_at and after.head_pid != before.head_pid
    assert edge.token_file.read_text() != old_token
    assert stat.S_IMODE(edge.token_file.stat().st_mode) == 0o640
    assert (edge.token_file.stat().st_uid, edge.token_file.stat().st_gid) == (0, edge._user().pw_gid)
    # the core: the same head, coordinator and Serve (controller and proxy actors)
    assert (pool.head.pid, pool.coordinator.pid) == (core_head, coordinator)  # type: ignore[union-attr]
    assert serve_actors(pool.dashboard_url, pool.token_file) == core_serve
    # the edge answers the new token and refuses the old one
    assert serve_actors(edge.dashboard_url, edge.token_file)
    old = edge.dir.parent / f"rma-it-old-edge-token-{os.getpid()}"
    old.write_text(old_token)
    old.chmod(0o600)
    try:
        assert refused(driver(edge.ray_address, old, timeout=240))
    finally:
        old.unlink()


def serve_actors(dashboard_url: str, token_file: Path) -> dict[str, Any]:
    """Serve's controller, proxy and replica ids (they change when Serve starts again or an app redeploys)."""
    r = httpx.get(
        dashboard_url + "/api/serve/applications/",
        headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return {
        "controller": body.get("controller_info", {}).get("actor_id"),
        "proxies": sorted(p.get("actor_id") for p in (body.get("proxies") or {}).values()),
        "replicas": sorted(
            rep["replica_id"]
            for app in (body.get("applications") or {}).values()
            for dep in (app.get("deployments") or {}).values()
            for rep in dep.get("replicas") or []
        ),
    }


def test_a_killed_edge_head_comes_back_and_the_core_goes_on(pool: Pool) -> None:
    before = edge_info(pool)
    core_head = pool.head.pid  # type: ignore[union-attr]
    gcs = [p for p in psutil.Process(before.head_pid).children(recursive=True) if p.name() == "gcs_server"]
    assert len(gcs) == 1
    gcs[0].send_signal(signal.SIGKILL)

    def back() -> poolinfo.EdgeInfo | None:
        now = edge_info(pool)
        return now if now.head_pid not in (None, before.head_pid) else None

    now = wait_for(back, timeout=300, interval=1, what="the supervisor to restart the edge head")
    assert now is not None and now.head_pid
    assert psutil.Process(now.head_pid).username() == "rma-edge"
    assert serve_actors(pool.edges[EDGE].dashboard_url, pool.edges[EDGE].token_file)["proxies"]
    assert pool.head.pid == core_head and pool.head.running()  # type: ignore[union-attr]
    assert any("the edge head 'edge' stopped; restarting it" in line for line in pool.said)  # type: ignore[attr-defined]


def nft_table(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nft", "list", "table", "inet", edge_guard_table(data_dir)],
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.skipif(not shutil.which("nft"), reason="no nft: `rma up` says the edge users are not firewalled")
def test_rma_up_replaced_a_crashed_runs_edge_guard(pool: Pool) -> None:
    """Without the overlay, the edge guard is a table of the pool's own; the one a crashed run left (the
    fixture's `stale` set) is replaced by the next `rma up`'s."""
    assert pool.edge_guard is not None and pool.edge_guard.table == edge_guard_table(pool.o.data_dir)
    listed = nft_table(pool.o.data_dir)
    assert listed.returncode == 0, listed.stderr
    assert "set stale" not in listed.stdout and "chain output" in listed.stdout, listed.stdout


def test_rma_status_on_the_head_names_each_cluster(pool: Pool) -> None:

    r = subprocess.run(
        [sys.executable, "-m", "rma_ray.cli", "status", "--data-dir", str(pool.o.data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["role"] == "head (rma up)"
    assert view["cluster core"].startswith(f"Ray {pool.o.gcs_address}")
    edge = edge_info(pool)
    assert view[f"cluster {EDGE}"] == (
        f"Ray {edge.ray_address}, Serve {edge.serve_url}, as rma-edge, head pid {edge.head_pid}"
    )


def test_rma_down_stops_both_heads(pool: Pool) -> None:
    pool.head.track()  # type: ignore[union-attr]
    edge = pool.edges[EDGE]
    edge.node.track()  # type: ignore[union-attr]
    procs = []
    for pid in [*pool.head.pids(), *edge.node.pids()]:  # type: ignore[union-attr]
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    assert any(p.username() == "rma-edge" for p in procs)
    # a process of the edge's user that left the node's tree (as a task that double-forks with setsid would):
    # `rma down` ends it too (every process of the edge's own user)
    pw = edge._user()
    stray = subprocess.Popen(
        ["sleep", "600"], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], start_new_session=True
    )
    guarded = shutil.which("nft") is not None
    assert (pool.edge_guard is not None) == guarded
    pool.stop_event.set()
    pool.supervisor.join(120)  # type: ignore[attr-defined]
    pool.down()
    if guarded:  # the edge guard's table goes with the pool
        assert nft_table(pool.o.data_dir).returncode != 0, nft_table(pool.o.data_dir).stdout
    stray.wait(30)  # a `sleep 600`: gone only because `rma down` killed it (TimeoutExpired otherwise)
    left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]
    info = poolinfo.read(pool.o.data_dir)
    assert info.head_pid is None and info.edges and info.edges[EDGE].head_pid is None
