"""Data stores under their Ray supervisors on a real multi-node Ray cluster (process runtime): placement only on
trusted data-tier nodes, real readiness, 1,000 acknowledged records that survive the supervisor's death and the
store process's death. Drivers run as child processes (a Ray client reads its token settings once, at import):
one kept for the module runs the polls and most scripts (a fresh driver costs 2-4 s)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.support import free_port, wait_for
from tests.support.driver import Driver

pytestmark = [pytest.mark.ray]
INIT = "ray.init(logging_level='ERROR', log_to_driver=False)"
POLL = 0.5  # s between polls: each asks the supervisor or Ray's state API, on a 2-core box the stores share
STORES = ["redis", "postgres", "chroma", "graph"]
pytestmark.append(
    pytest.mark.skipif(not shutil.which("redis-server"), reason="Debian redis-server not installed")
)


@dataclass
class Cluster:
    root: Path
    token: Path
    address: str
    ip: str
    nodes: dict[str, RayNode]
    stores: Path  # store volumes: a path the `postgres` user can traverse (pytest's tmp is 0700)
    kept: Driver | None = None

    def env(self) -> dict[str, str]:
        return {
            **ray_env(self.token),
            "RAY_ADDRESS": self.address,
            "HOME": str(self.root / "home"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }

    def driver(self, script: str, timeout: float = 180, fresh: bool = False) -> Any:
        """`script`'s answer (the JSON it printed last), run on the module's kept driver; `fresh`: on a new
        driver of its own, for a script that changes module state (a monkeypatch) the next would inherit."""
        if self.kept is None:
            self.kept = Driver(self.env(), self.root / "driver.log", INIT)
        if not fresh:
            return self.kept.run(textwrap.dedent(script), timeout)
        r = subprocess.run(
            [sys.executable, "-c", "import json, ray\n" + INIT + "\n" + textwrap.dedent(script)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def add_node(self, key: str, labels: dict[str, str]) -> RayNode:
        spec = NodeSpec(
            node_ip=self.ip,
            token_file=self.token,
            temp_dir=short_temp_dir(f"it-{key}-{os.getpid()}"),
            labels=labels,
            address=self.address,
            num_cpus=1,
            drain_timeout_s=2,
            env={"RMA_DATA_DIR": str(self.root / key), "RMA_STORES_DIR": str(self.stores / key)},
        )
        node = RayNode(spec, self.root / f"{key}.log")
        node.start()
        node.wait_started(120)
        self.nodes[key] = node
        return node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray head plus an untrusted data node (~20 s); the trusted data node joins in the first test."""
    root = tmp_path_factory.mktemp("stores")
    token = root / "cluster_token"
    read_or_create_secret(token)
    ip = local_ip_towards("192.0.2.1")
    port = free_port(ip)
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"it-head-{os.getpid()}"),
            labels={"rma.io/tier": "head"},
            gcs_port=port,
            dashboard_port=free_port(ip),
            num_cpus=1,
            drain_timeout_s=2,
        ),
        root / "head.log",
    )
    head.start()
    stores = Path(tempfile.mkdtemp(prefix="rma-it-stores-"))
    stores.chmod(0o755)
    c = Cluster(root, token, f"{ip}:{port}", ip, {"head": head}, stores)
    try:
        head.wait_started(120)
        c.add_node(
            "untrusted", {"rma.io/tier": "data", "rma.io/trusted": "false", "rma.io/node": "untrusted"}
        )
        yield c
    finally:
        try:
            c.driver(
                """
                for s in %r:
                    try:
                        a = ray.get_actor("rma-store-" + s, namespace="rma")
                        ray.get(a.stop.remote(), timeout=60)
                        ray.kill(a, no_restart=True)
                    except Exception:
                        pass
                print("{}")
            """
                % STORES,
                timeout=120,
            )
        finally:
            if c.kept is not None:
                c.kept.close()
            # each node stopped at once, GCS last, the head last (a raylet whose GCS went first waits ~10 s for
            # it): the stores are stopped above and nothing else on the nodes needs draining; `ray start`'s own
            # stop waits on its processes one by one
            for node in reversed(list(c.nodes.values())):
                node.stop_all(grace=5)
                shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
            for pidfile in stores.glob("*/*/.rma-pid.json"):  # a store the supervisor could not stop
                try:
                    os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            shutil.rmtree(stores, ignore_errors=True)


STATUS = """
from deployments.stores import supervisor
a = supervisor.ensure(%(store)r)
print(json.dumps(ray.get(a.status.remote())))
"""


def actor_state(c: Cluster, store: str) -> str:
    return c.driver(
        """
        from ray.util.state import list_actors
        found = [a.state for a in list_actors(filters=[("name", "=", "rma-store-%s")])]
        print(json.dumps(found[-1] if found else "none"))
    """
        % store
    )


def live_actor_states(c: Cluster, store: str) -> list[str]:
    """The states of the store's supervisor actors that are not DEAD (earlier incarnations stay listed)."""
    return c.driver(  # type: ignore[no-any-return]
        """
        from ray.util.state import list_actors
        found = [a.state for a in list_actors(filters=[("name", "=", "rma-store-%s")])]
        print(json.dumps([s for s in found if s != "DEAD"]))
    """
        % store
    )


def test_stores_wait_for_a_trusted_data_node_and_never_use_an_untrusted_one(cluster: Cluster) -> None:
    for store in STORES:
        cluster.driver(
            """
            from deployments.stores import supervisor
            supervisor.ensure(%r)
            print("{}")
        """
            % store
        )
    # only an untrusted data node (and the head) exist: the supervisors wait, they do not settle there
    for store in STORES:
        wait_for(
            lambda s=store: actor_state(cluster, s) == "PENDING_CREATION",
            timeout=30,
            interval=POLL,
            what=f"{store} supervisor pending",
        )
    cluster.add_node("trusted", {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "trusted"})
    for store in STORES:
        wait_for(
            lambda s=store: actor_state(cluster, s) == "ALIVE",
            timeout=60,
            interval=POLL,
            what=f"{store} supervisor placed",
        )
        st = cluster.driver(STATUS % {"store": store})
        assert st["labels"]["rma.io/trusted"] == "true" and st["labels"]["rma.io/tier"] == "data"
        assert st["labels"]["rma.io/node"] == "trusted"


@pytest.mark.parametrize("store", STORES)
def test_ready_with_a_real_query_and_credentials_kept_private(cluster: Cluster, store: str) -> None:
    ep = cluster.driver(
        """
        from deployments.stores import supervisor
        supervisor.ensure(%r)
        print(json.dumps(supervisor.endpoint(%r).__dict__))
    """
        % (store, store)
    )
    assert ep["host"] == cluster.ip
    assert (
        ep["password"] or store == "chroma"
    )  # Chroma 1.x has no authentication: it listens on the pool address
    st = cluster.driver(STATUS % {"store": store})
    assert st["status"] == "ready" and st["ready_s"] is not None and st["size_bytes"] > 0
    creds = cluster.stores / "trusted" / store / ".rma-credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    proc = psutil.Process(st["pid"])
    assert not ep["password"] or ep["password"] not in " ".join(proc.cmdline())


def test_store_credentials_are_refused_to_an_untrusted_node(cluster: Cluster) -> None:
    """A task on the untrusted data node asks the supervisor for the password (issue 16): refused; a task on
    the trusted node and the head's driver get it. Without the overlay the store's port is not firewalled, and
    status() says so."""
    out = cluster.driver("""
        from deployments.stores import supervisor

        @ray.remote(num_cpus=0)
        def fetch():
            try:
                return "handed over: " + str(bool(supervisor.endpoint("redis", 60).password))
            except Exception as exc:
                return str(exc)

        a = supervisor.ensure("redis")
        on = lambda node: fetch.options(label_selector={"rma.io/node": node}).remote()
        print(json.dumps({"untrusted": ray.get(on("untrusted"), timeout=120),
                          "trusted": ray.get(on("trusted"), timeout=120),
                          "head": bool(supervisor.endpoint("redis").password),
                          "firewall": ray.get(a.status.remote())["firewall"]}))
    """)
    assert "credentials go only to trusted nodes" in out["untrusted"], out
    assert out["trusted"] == "handed over: True" and out["head"] is True
    assert out["firewall"].startswith("off: not wanted")


WRITE = {
    "redis": """
        import redis
        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        acked = sum(1 for i in range(1000) if r.set(f"rec:{i}", f"value-{i}"))
    """,
    "postgres": """
        import psycopg
        with psycopg.connect(ep.url(), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS recs (id int PRIMARY KEY, v text)")
            acked = 0
            for i in range(1000):
                c.execute("INSERT INTO recs VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                          (i, f"value-{i}"))
                acked += 1
    """,
    "chroma": """
        import chromadb
        c = chromadb.HttpClient(host=ep.host, port=ep.port)
        col = c.get_or_create_collection("recs", embedding_function=None)
        acked = 0
        for start in range(0, 1000, 100):  # explicit embeddings: no model download
            ids = [f"rec-{i}" for i in range(start, start + 100)]
            col.upsert(ids=ids, documents=[f"value-{i}" for i in range(start, start + 100)],
                       embeddings=[[float(i % 7), float(i % 11), 1.0] for i in range(start, start + 100)])
            acked += 100
    """,
    "graph": """
        from neo4j import GraphDatabase
        with GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d:
            acked = 0
            with d.session(database=ep.database) as s:
                for i in range(1000):
                    s.run("MERGE (r:Rec {id: $id}) SET r.v = $v", id=i, v=f"value-{i}").consume()
                    acked += 1
    """,
}
COUNT = {
    "redis": """
        import redis
        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        n = sum(1 for i in range(1000) if r.get(f"rec:{i}") == f"value-{i}".encode())
    """,
    "postgres": """
        import psycopg
        with psycopg.connect(ep.url()) as c:
            n = c.execute("SELECT count(*) FROM recs WHERE v = 'value-' || id").fetchone()[0]
    """,
    "chroma": """
        import chromadb
        col = chromadb.HttpClient(host=ep.host, port=ep.port).get_collection("recs", embedding_function=None)
        got = col.get(ids=[f"rec-{i}" for i in range(1000)])
        n = sum(1 for i, d in zip(got["ids"], got["documents"]) if d == "value-" + i[4:])
    """,
    "graph": """
        from neo4j import GraphDatabase
        with GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d, d.session(database=ep.database) as s:
            rows = s.run("MATCH (r:Rec) RETURN r.id AS id, r.v AS v").values()
        n = len({i for i, v in rows if v == f"value-{i}"})
    """,
}


def _run(c: Cluster, store: str, body: str, out: str) -> Any:
    return c.driver(
        "from deployments.stores import supervisor\nsupervisor.ensure(%r)\n"
        "ep = supervisor.endpoint(%r)\n"
        % (store, store)
        + textwrap.dedent(body)
        + f"\nprint(json.dumps({out}))"
    )


@pytest.mark.parametrize("store", STORES)
def test_1000_records_survive_supervisor_and_store_deaths(cluster: Cluster, store: str) -> None:
    assert _run(cluster, store, WRITE[store], "acked") == 1000
    before = cluster.driver(STATUS % {"store": store})
    # 1. the supervisor actor dies (Ray restarts it, and by default kills the dead worker's children too):
    #    the new supervisor adopts the store if it survived, or restarts it on the same volume
    cluster.driver(
        """
        a = ray.get_actor("rma-store-%s", namespace="rma")
        ray.kill(a, no_restart=False)
        print("{}")
    """
        % store
    )
    wait_for(
        lambda: cluster.driver(STATUS % {"store": store})["supervisor_pid"] != before["supervisor_pid"],
        timeout=60,
        interval=POLL,
        what="the supervisor to be restarted by Ray",
    )
    after = wait_for(
        lambda: (lambda s: s if s["status"] == "ready" else None)(cluster.driver(STATUS % {"store": store})),
        timeout=90,
        interval=POLL,
        what="the store to be ready under the new supervisor",
    )
    assert after["adopted"] == (after["pid"] == before["pid"])
    assert _run(cluster, store, COUNT[store], "n") == 1000
    # 2. the store process itself dies hard: the supervisor restarts it on the same volume
    os.kill(after["pid"], signal.SIGKILL)
    wait_for(
        lambda: (lambda s: s["status"] == "ready" and s["pid"] != after["pid"])(
            cluster.driver(STATUS % {"store": store})
        ),
        timeout=90,
        interval=POLL,
        what="the store to be restarted",
    )
    assert _run(cluster, store, COUNT[store], "n") == 1000


def test_port_taken_is_a_clear_error(cluster: Cluster) -> None:
    import socket

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port(cluster.ip)
    holder.bind((cluster.ip, port))
    holder.listen()
    try:
        st = cluster.driver(
            """
            import time
            from deployments.stores.supervisor import StoreSupervisor, TRUSTED_DATA
            a = ray.remote(StoreSupervisor).options(num_cpus=0, label_selector=TRUSTED_DATA).remote(
                "redis", "process", %d, "/tmp/rma-it-porttaken")
            for _ in range(100):
                st = ray.get(a.status.remote())
                if st["error"]:
                    break
                time.sleep(0.1)
            ray.kill(a)
            print(json.dumps(st))
        """
            % port
        )
    finally:
        holder.close()
        shutil.rmtree("/tmp/rma-it-porttaken", ignore_errors=True)
    assert st["status"] == "failed" and f"port {port}" in st["error"] and "taken" in st["error"]


DROP = {  # half the records go after the backup: the restore must bring them back
    "redis": """
        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        r.delete(*[f"rec:{i}" for i in range(500)])
    """,
    "postgres": """
        with psycopg.connect(ep.url(), autocommit=True) as c:
            c.execute("DELETE FROM recs WHERE id < 500")
    """,
    "chroma": """
        col.delete(ids=[f"rec-{i}" for i in range(500)])
    """,
    "graph": """
        with GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d, d.session(database=ep.database) as s:
            s.run("MATCH (r:Rec) WHERE r.id < 500 DETACH DELETE r").consume()
    """,
}


def rma(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The `rma` CLI on the operator's machine, joining this cluster by RAY_ADDRESS and the token's path."""
    env = {
        **ray_env(c.token),
        "RAY_ADDRESS": c.address,
        "HOME": str(c.root / "home"),
        "RMA_DATA_DIR": str(c.root / "cli"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    return subprocess.run(
        [sys.executable, "-m", "rma_ray.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _cli_run(c: Cluster, store: str, steps: list[tuple[str, Any]]) -> dict[str, Any]:
    """One driver (a Ray driver costs seconds to start) that runs, in order, `rma` commands (in process, on this
    driver's connection) and record scripts; returns each record script's `n` by name, and the store's status.
    Writes the 1,000 records first when they are not there (the test runs alone)."""
    body = [
        "from deployments.stores import supervisor",
        "from rma_ray.cli import app",
        f"supervisor.ensure({store!r})",
        f"ep = supervisor.endpoint({store!r})",
        "results = {}",
        "try:",
        textwrap.indent(textwrap.dedent(COUNT[store]), "    "),
        "except Exception:",
        "    n = 0",
        "if n != 1000:",
        textwrap.indent(textwrap.dedent(WRITE[store]), "    "),
    ]
    for what, arg in steps:
        if what == "rma":
            body.append(f"app({list(arg)!r}, standalone_mode=False)")
        else:
            body += [textwrap.dedent(arg), f"results[{what!r}] = n"]
    body += [
        f"ep = supervisor.endpoint({store!r})",
        textwrap.dedent(COUNT[store]),
        "results['final'] = n",
        f"results['status'] = ray.get(supervisor.ensure({store!r}).status.remote())",
        "print(json.dumps(results))",
    ]
    # its own driver: BEFORE_RESTORE patches the CLI's module, which a kept driver would keep
    return c.driver("\n".join(body), timeout=540, fresh=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("store", STORES)
def test_backup_and_restore_keep_the_acknowledged_records(
    cluster: Cluster, store: str, tmp_path: Path
) -> None:
    """`rma stores backup` with the store's own tool, half the records dropped, `rma stores restore`: the 1,000
    acknowledged records are back (a wrong or damaged backup is refused: tests/unit/test_stores_backup.py)."""
    dest = tmp_path / f"{store}-backup"
    got = _cli_run(
        cluster,
        store,
        [
            ("rma", ["stores", "backup", store, str(dest)]),
            ("dropped", COUNT[store] + DROP[store] + COUNT[store]),
            ("rma", ["stores", "restore", store, str(dest)]),
        ],
    )
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["store"] == store and manifest["size_bytes"] == (dest / manifest["file"]).stat().st_size
    assert got["dropped"] == 500 and got["final"] == 1000 and got["status"]["status"] == "ready"


STATUS_NOW = """
a = ray.get_actor("rma-store-%(store)s", namespace="rma")
try:
    print(json.dumps(ray.get(a.status.remote(), timeout=5)))
except Exception:  # Ray is restarting it (its node left): not placed yet
    print(json.dumps(None))
"""


def _status_is(c: Cluster, store: str, **want: Any) -> dict[str, Any] | None:
    st = c.driver(STATUS_NOW % {"store": store})
    return st if st and all(st.get(k) == v for k, v in want.items()) else None


def test_a_store_stays_with_its_donor_when_the_donor_goes(cluster: Cluster) -> None:
    """The donor hosting the stores leaves while a second trusted data donor is online: Ray restarts the
    supervisors there, and they wait for their donor instead of starting empty stores; when the donor is back,
    each supervisor returns to it and its store serves the 1,000 acknowledged records."""
    labels = {"rma.io/tier": "data", "rma.io/trusted": "true"}
    cluster.add_node("trusted2", {**labels, "rma.io/node": "trusted2"})
    before = cluster.driver(STATUS % {"store": "postgres"})
    assert before["donor"] == "trusted" and before["pinned_to"] == "trusted" and before["status"] == "ready"
    cluster.nodes.pop("trusted").stop(timeout=30)
    waiting = wait_for(
        lambda: _status_is(cluster, "postgres", status="waiting", donor="trusted2"),
        timeout=120,
        interval=POLL,
        what="the postgres supervisor to be restarted on trusted2 and wait there",
    )
    assert waiting["waiting_for"] == "trusted" and waiting["pid"] is None
    assert "waiting for trusted" in waiting["error"]
    assert not (cluster.stores / "trusted2" / "postgres" / "pgdata").exists()  # no empty store started
    cluster.add_node("trusted", {**labels, "rma.io/node": "trusted"})
    for store in STORES:  # every supervisor goes back (the module's teardown stops them there)
        wait_for(
            lambda s=store: _status_is(cluster, s, status="ready", donor="trusted"),
            timeout=180,
            interval=POLL,
            what=f"{store} back on its donor and ready",
        )
    assert _run(cluster, "postgres", COUNT["postgres"], "n") == 1000


def test_move_refuses_a_donor_that_may_not_hold_stores(cluster: Cluster) -> None:
    r = rma(cluster, "stores", "move", "redis", "--to", "untrusted")
    assert r.returncode == 1 and "untrusted is not a trusted data donor that is online" in r.stderr, r.stderr
    assert _status_is(cluster, "redis", status="ready", donor="trusted")  # nothing moved


# a move's freeze (backup_begin(freeze=True)), then unfreeze as a move that fails before its switch does:
# n = 1 if writes were refused (reads still served where the store runs), + 10 if they are taken again after
FROZEN = {
    "redis": """
        import redis
        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        try:
            r.set("rec:frozen", "x")
            n = 0
        except redis.exceptions.ResponseError as exc:
            n = int("NOREPLICAS" in str(exc) and r.get("rec:0") == b"value-0")
        ray.get(sup.unfreeze.remote(), timeout=200)
        n += 10 * bool(r.set("rec:frozen", "x") and r.delete("rec:frozen"))
    """,
    "postgres": """
        import psycopg
        with psycopg.connect(ep.url(), autocommit=True) as c:
            try:
                c.execute("INSERT INTO recs VALUES (-1, 'frozen')")
                n = 0
            except psycopg.errors.ReadOnlySqlTransaction:
                n = int(c.execute("SELECT count(*) FROM recs").fetchone()[0] == 1000)
        ray.get(sup.unfreeze.remote(), timeout=200)
        with psycopg.connect(ep.url(), autocommit=True) as c:
            n += 10 * (c.execute("INSERT INTO recs VALUES (-1, 'x') RETURNING id").fetchone()[0] == -1)
            c.execute("DELETE FROM recs WHERE id = -1")
    """,
}
FREEZE = """
    sup = supervisor.ensure(%r)
    begun = ray.get(sup.backup_begin.remote(ray.get_runtime_context().get_node_id(), True), timeout=300)
    ray.get(sup.transfer_end.remote(begun["transfer"]))
    st = ray.get(sup.status.remote())
"""
STOPPED_FROZEN = """
    n = int(st["status"] == "frozen" and st["frozen"])
    ray.get(sup.unfreeze.remote(), timeout=200)
    n += 10 * (ray.get(sup.status.remote())["status"] == "ready")
"""

# before the move's restore (its new supervisor exists, its store runs empty): what a service asking for the
# store's endpoint gets, how fast, and the store's status; `n` is the dict, filled in during the move
BEFORE_RESTORE = """
    import time
    import rma_ray.cli.stores as cli_stores
    probe, real_upload = {}, cli_stores._upload
    def probing_upload(ray, sup, store, *args, hold=False, **kw):
        if hold:  # the move's own restore
            t0 = time.monotonic()
            try:
                probe["endpoint"] = "handed out: %s" % supervisor.endpoint(store, timeout=30).port
            except Exception as exc:
                probe["endpoint"] = str(exc)
            probe["endpoint_s"] = time.monotonic() - t0
            probe["status"] = ray.get(sup.status.remote())["status"]
        return real_upload(ray, sup, store, *args, hold=hold, **kw)
    cli_stores._upload = probing_upload
    n = probe
"""


@pytest.mark.parametrize("store", STORES)
def test_move_to_another_trusted_data_donor_keeps_the_records(cluster: Cluster, store: str) -> None:
    """`rma stores move`: writes refused, backup, a new supervisor pinned on the target, restore, counts
    checked, switch. First the freeze alone, and its undoing (a move that fails before its switch). Before
    the restore the new store runs empty and its endpoint goes to nobody (a service would find no data, or
    write what the restore then replaces)."""
    if "trusted2" not in cluster.nodes:  # run alone
        cluster.add_node(
            "trusted2", {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "trusted2"}
        )
    frozen = textwrap.dedent(FREEZE % store) + textwrap.dedent(FROZEN.get(store, STOPPED_FROZEN))
    got = _cli_run(
        cluster,
        store,
        [
            ("frozen", frozen),
            ("before_restore", BEFORE_RESTORE),
            ("rma", ["stores", "move", store, "--to", "trusted2"]),
        ],
    )
    assert got["frozen"] == 11, got  # refused while frozen, served reads; taken again after
    probe = got["before_restore"]
    assert f"{store} is being moved to trusted2: waiting for its data" in probe["endpoint"], probe
    assert probe["endpoint_s"] < 10 and probe["status"] == "awaiting-restore", probe
    st = got["status"]
    assert st["donor"] == "trusted2" and st["pinned_to"] == "trusted2" and st["status"] == "ready"
    assert got["final"] == 1000


def test_move_from_a_backup_when_the_donor_is_gone(cluster: Cluster, tmp_path: Path) -> None:
    """`rma stores move --from-backup`: a bad backup, or a ready store without --force, is refused and moves
    nothing; once the donor holding redis is gone, redis starts on the other trusted data donor with exactly
    the backup's records (a record written after the backup is not there). The donor then rejoins, so the
    other stores (pinned there) are back for the module's teardown."""
    labels = {"rma.io/tier": "data", "rma.io/trusted": "true"}
    for key in ("trusted", "trusted2"):  # run alone
        if key not in cluster.nodes:
            cluster.add_node(key, {**labels, "rma.io/node": key})
    dest = tmp_path / "redis-backup"
    got = _cli_run(
        cluster,
        "redis",
        [  # a marker no older copy of the volume holds, then the backup, then a record after it
            ("marker", "r.set('rec:frombackup', 'in the backup')\nn = 1"),
            ("rma", ["stores", "backup", "redis", str(dest)]),
            ("later", "r.set('rec:later', 'after the backup')\nn = 1"),
        ],
    )
    held = got["status"]["donor"]
    other = "trusted" if held == "trusted2" else "trusted2"
    bad = tmp_path / "bad"
    shutil.copytree(dest, bad)
    (bad / "redis.rdb").write_bytes(b"not the backup")
    r = rma(cluster, "stores", "move", "redis", "--to", other, "--from-backup", str(bad), "--force")
    assert r.returncode == 1 and "does not match manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = rma(cluster, "stores", "move", "redis", "--to", other, "--from-backup", str(dest))
    assert r.returncode == 1 and f"redis is ready on {held}" in r.stderr and "--force" in r.stderr, r.stderr
    assert _status_is(cluster, "redis", status="ready", donor=held)  # nothing moved
    cluster.nodes.pop(held).stop(timeout=30)
    try:
        wait_for(
            lambda: (
                "ALIVE" not in live_actor_states(cluster, "redis")
                or _status_is(cluster, "redis", status="waiting")
            ),
            timeout=60,
            interval=POLL,
            what="the redis supervisor to wait for its donor (or Ray to be unable to place it)",
        )
        r = rma(cluster, "stores", "move", "redis", "--to", other, "--from-backup", str(dest))
        assert r.returncode == 0 and f"redis moved to {other} from the backup" in r.stdout, r.stderr
        after = _run(
            cluster,
            "redis",
            textwrap.dedent(COUNT["redis"])
            + "\nlater = r.get('rec:later')\nmarker = (r.get('rec:frombackup') or b'').decode()",
            "{'n': n, 'later': later, 'marker': marker}",
        )
        # the 1,000 records and the marker (restored, not an older copy of the volume); not the record after
        assert after == {"n": 1000, "later": None, "marker": "in the backup"}, after
        assert _status_is(cluster, "redis", status="ready", donor=other, pinned_to=other)
    finally:  # the other stores (pinned there) back for the module's teardown, whatever happened
        cluster.add_node(held, {**labels, "rma.io/node": held})
        existing = cluster.driver(
            "names = {a['name'] for a in ray.util.list_named_actors(all_namespaces=True)}\n"
            f"print(json.dumps([s for s in {STORES[1:]!r} if 'rma-store-' + s in names]))"
        )
        for store in existing:  # run alone, only redis's supervisor exists
            wait_for(
                lambda s=store: _status_is(cluster, s, status="ready"),
                timeout=180,
                interval=POLL,
                what=f"{store} back on {held} and ready",
            )
