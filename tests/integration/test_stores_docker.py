"""Data stores under the docker runtime, against a real dockerd (tests/docker_support.py starts a private one and
builds the images from images/ into it): the container's shape (labels, host network, bind-mounted volume,
non-root, no secret in `docker inspect`), adoption, orphan removal, clear errors; then on a real multi-node Ray
cluster: placement only on the trusted data node, 1,000 acknowledged records that survive the supervisor's death
(the container is adopted, a dead supervisor's orphan removed) and the container's death."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from deployments.stores.docker_runtime import (
    LABEL_ENDPOINT,
    LABEL_ROLE,
    LABEL_STORE,
    LABEL_SUPERVISOR,
    LABEL_VOLUME,
    DockerRuntime,
)
from deployments.stores.kinds import KINDS, credentials
from deployments.stores.runtime import StoreError
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.docker_support import Dockerd, dockerd_for_session, start_to_ready
from tests.integration.test_stores import COUNT, WRITE, Cluster
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.docker]
STORES = ["redis", "postgres", "chroma", "graph"]
HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """A private dockerd with the store images built (2.5-7 min cold, ~2 s with its kept data root); session-scoped."""
    yield from dockerd_for_session()


@pytest.fixture
def volumes() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="rma-it-docker-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def runtime(store: str, root: Path, port: int | None = None) -> tuple[DockerRuntime, Any]:
    vol = root / store
    vol.mkdir(exist_ok=True)
    creds = credentials(vol)
    rt = DockerRuntime(KINDS[store], vol, HOST, port or free_port(HOST, span=2), creds)
    return rt, KINDS[store].endpoint(HOST, rt.port, creds)


def _chroma(ep: Any) -> Any:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.HttpClient(host=ep.host, port=ep.port, settings=Settings(anonymized_telemetry=False))
    return client.get_or_create_collection("few", embedding_function=None)


def _graph(ep: Any, cypher: str) -> Any:
    from neo4j import GraphDatabase

    with (
        GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d,
        d.session(database=ep.database) as s,
    ):
        return s.run(cypher).single()


WRITE_FEW = {
    "redis": lambda ep: (
        __import__("redis")
        .Redis(host=ep.host, port=ep.port, password=ep.password)
        .mset({f"k{i}": f"v{i}" for i in range(10)})
    ),
    "postgres": lambda ep: _pg(ep, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g"),
    "chroma": lambda ep: _chroma(ep).upsert(
        ids=[f"k{i}" for i in range(10)], embeddings=[[float(i), 1.0] for i in range(10)]
    ),
    "graph": lambda ep: [_graph(ep, f"CREATE (:Few {{id: {i}}})") for i in range(10)],
}
COUNT_FEW = {
    "redis": lambda ep: sum(
        1
        for v in __import__("redis")
        .Redis(host=ep.host, port=ep.port, password=ep.password)
        .mget([f"k{i}" for i in range(10)])
        if v
    ),
    "postgres": lambda ep: _pg(ep, "SELECT count(*) FROM t")[0],
    "chroma": lambda ep: _chroma(ep).count(),
    "graph": lambda ep: _graph(ep, "MATCH (n:Few) RETURN count(n) AS n")["n"],
}


def _pg(ep: Any, sql: str) -> Any:
    import psycopg

    with psycopg.connect(ep.url(), autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchone() if cur.description else None


@pytest.mark.parametrize("store", STORES)
def test_store_container_shape_adoption_and_removal(dockerd: Dockerd, volumes: Path, store: str) -> None:
    client = dockerd.client()
    rt, ep = runtime(store, volumes)
    try:
        print(f"\n[docker] {store}: first start -> ready {start_to_ready(rt, KINDS[store], ep):.2f} s")
        attrs = client.containers.get(rt.container_name).attrs
        labels = attrs["Config"]["Labels"]
        assert labels[LABEL_STORE] == store and labels[LABEL_VOLUME] == str(rt.volume)
        assert labels[LABEL_ENDPOINT] == f"{HOST}:{rt.port}" and labels[LABEL_ROLE] == "store"
        assert attrs["HostConfig"]["NetworkMode"] == "host"
        assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
        assert [(m["Source"], m["Destination"]) for m in attrs["Mounts"]] == [
            (str(rt.volume / "container"), "/data")
        ]
        assert attrs["State"]["Pid"] == rt.pid and attrs["State"]["Health"]["Status"] in (
            "starting",
            "healthy",
        )
        # the secret is nowhere docker shows, nor on the host's view of the process
        proc = psutil.Process(rt.pid)
        assert proc.uids().real == 999
        if ep.password:  # Chroma 1.x has none (it listens on the pool address only)
            shown = json.dumps([attrs["Config"].get(k) for k in ("Cmd", "Entrypoint", "Env", "Labels")])
            assert ep.password not in shown
            assert ep.password not in " ".join(proc.cmdline()) and ep.password not in json.dumps(
                proc.environ()
            )
        assert oct((rt.volume / ".rma-credentials.json").stat().st_mode & 0o777) == "0o600"
        data = rt.volume / "container"
        assert not (data / ".pwfile").exists()  # postgres: initdb's password file is gone after initdb
        for secret in (data / "redis.conf", data / ".root-password"):
            if secret.exists():
                assert (secret.stat().st_mode & 0o777, secret.stat().st_uid) == (0o600, 999)
        wait_for(
            lambda: client.containers.get(rt.container_name).attrs["State"]["Health"]["Status"] == "healthy",
            timeout=60,
            what=f"docker's health check of {store} to pass",
        )

        WRITE_FEW[store](ep)
        # a new supervisor on the same volume adopts the running container instead of starting a second one
        rt2, _ = runtime(store, volumes, rt.port)
        assert rt2.adopt() and rt2.container.id == rt.container.id and rt2.pid == rt.pid and rt2.alive()
        assert rt2.reconcile_orphans("next-incarnation") == []  # the adopted container is not an orphan
        assert COUNT_FEW[store](ep) == 10
        rt2.stop()
        assert not rt.alive() and not client.containers.list(all=True, filters={"name": rt.container_name})
        assert (rt.volume / f"{store}.log").stat().st_size > 0  # the container's output is kept
        # (a new container on the kept volume, with the data: test_1000_records_survive_..., and the orphan test)
    finally:
        rt.stop(5)
        client.close()


def test_orphans_of_a_dead_supervisor_are_removed_and_a_dead_container_replaced(
    dockerd: Dockerd, volumes: Path
) -> None:
    client = dockerd.client()
    rt, ep = runtime("redis", volumes)
    rt.reconcile_orphans("incarnation-1")
    try:
        start_to_ready(rt, KINDS["redis"], ep)
        WRITE_FEW["redis"](ep)
        assert client.containers.get(rt.container_name).labels[LABEL_SUPERVISOR] == "incarnation-1"
        # what a supervisor that crashed mid-way leaves: a one-shot step still running and an exited one,
        # labelled for this store and volume; and a container of the same store on another volume
        base = {LABEL_STORE: "redis", LABEL_VOLUME: str(rt.volume), LABEL_SUPERVISOR: "incarnation-0"}
        running = client.containers.run(
            rt.spec.image,
            ["sleep", "infinity"],
            detach=True,
            network_mode="none",
            name=f"{rt.container_name}-init",
            labels={**base, LABEL_ROLE: "init"},
        )
        exited = client.containers.run(
            rt.spec.image, ["true"], detach=True, network_mode="none", labels={**base, LABEL_ROLE: "init"}
        )
        exited.wait(timeout=60)
        elsewhere = client.containers.run(
            rt.spec.image,
            ["sleep", "infinity"],
            detach=True,
            network_mode="none",
            labels={**base, LABEL_VOLUME: "/elsewhere/redis", LABEL_ROLE: "store"},
        )
        try:
            rt2, _ = runtime("redis", volumes, rt.port)
            assert rt2.adopt()
            removed = rt2.reconcile_orphans("incarnation-2")
            assert sorted(removed) == sorted([running.name, exited.name])
            left = {c.id for c in client.containers.list(all=True, filters={"label": f"{LABEL_STORE}=redis"})}
            assert left == {rt.container.id, elsewhere.id}
            # the store dies hard: the supervisor sees it and starts a new container on the same volume
            os.kill(rt2.pid, signal.SIGKILL)  # type: ignore[arg-type]
            wait_for(lambda: not rt2.alive(), timeout=30, what="docker to notice the dead store")
            rt2.start()
            wait_for(lambda: KINDS["redis"].ready(ep), timeout=60, what="redis in its new container")
            assert rt2.container.id != rt.container.id and COUNT_FEW["redis"](ep) == 10
            assert client.containers.get(rt.container_name).labels[LABEL_SUPERVISOR] == "incarnation-2"
            rt2.stop()
        finally:
            elsewhere.remove(force=True)
    finally:
        rt.stop(5)
        client.close()


def test_errors_say_what_to_fix(dockerd: Dockerd, volumes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # image missing
    rt, _ = runtime("redis", volumes)
    rt.spec = dataclasses.replace(rt.spec, image="rma-store-redis:never-built")
    with pytest.raises(
        StoreError, match=r"image rma-store-redis:never-built is missing .*build-store-images.sh redis"
    ):
        rt.start()
    # port taken
    holder = socket.socket()
    holder.bind((HOST, 0))
    holder.listen()
    try:
        rt, _ = runtime("redis", volumes, holder.getsockname()[1])
        with pytest.raises(StoreError, match=f"port {rt.port} on {HOST} is taken"):
            rt.start()
    finally:
        holder.close()
    # disk full: the volume on a 16 MiB filesystem
    small = volumes / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        rt, _ = runtime("redis", small)
        with pytest.raises(StoreError, match=f"disk full: less than 200 MiB free under {small}"):
            rt.start()
    finally:
        subprocess.run(["umount", str(small)], check=True)
    # no daemon behind DOCKER_HOST
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/rma-test-docker/nobody-here.sock")
    rt, _ = runtime("redis", volumes)
    with pytest.raises(
        StoreError, match="docker daemon unreachable at unix:///run/rma-test-docker/nobody-here.sock"
    ):
        rt.start()
    assert not rt.adopt()
    # a store kind without a container spec says so instead of failing later
    fake = dataclasses.make_dataclass("Kind", [("name", str)])("timeseries")
    with pytest.raises(StoreError, match="no container image for the timeseries store yet"):
        DockerRuntime(fake, volumes, HOST, 1, {})


# -- on a real Ray cluster, through the supervisor ------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray head plus an untrusted data node (~20 s), with DOCKER_HOST set for their workers; module-scoped.
    The trusted data node joins in the first test."""
    root = tmp_path_factory.mktemp("stores-docker")
    token = root / "cluster_token"
    read_or_create_secret(token)
    ip = local_ip_towards("192.0.2.1")
    port = free_port(ip)
    assert (
        os.environ["DOCKER_HOST"] == dockerd.host
    )  # Ray nodes inherit it: supervisors reach the private dockerd
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"itd-head-{os.getpid()}"),
            labels={"rma.io/tier": "head"},
            gcs_port=port,
            dashboard_port=free_port(ip),
            num_cpus=1,
            drain_timeout_s=2,
        ),
        root / "head.log",
    )
    head.start()
    stores = Path(tempfile.mkdtemp(prefix="rma-itd-stores-"))
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
                        ray.get(a.stop.remote(), timeout=90)
                        ray.kill(a, no_restart=True)
                    except Exception:
                        pass
                print("{}")
            """
                % STORES,
                timeout=150,
            )
        finally:
            # the module's kept driver (test_stores.Cluster.driver) goes before its cluster
            if c.kept is not None:
                c.kept.close()
            # each node stopped at once, GCS last, the head last (a raylet whose GCS went first waits ~10 s for
            # it): the stores are stopped above and nothing else on the nodes needs draining; `ray start`'s own
            # stop waits on its processes one by one
            for node in reversed(list(c.nodes.values())):
                node.stop_all(grace=5)
                shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
            shutil.rmtree(stores, ignore_errors=True)


# Each driver below does one phase and polls inside itself: a driver process costs seconds to start on 2 cores.
WAIT = """
import os, signal, time
from deployments.stores import supervisor

def status(store):
    return ray.get(supervisor.ensure(store, runtime="docker").status.remote(), timeout=30)

def wait(store, cond, timeout=180):
    deadline, st = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            st = status(store)
            if cond(st):
                return st
        except Exception as exc:  # the actor is being restarted
            st = repr(exc)
        time.sleep(0.2)
    raise SystemExit(f"{store}: timed out; last status {st}")
"""


def _phase(c: Cluster, *parts: str) -> Any:
    # a first start of graph or chroma, 1,000 writes and two stop/starts on a loaded 2-core box
    return c.driver(WAIT + "\n".join(textwrap.dedent(p) for p in parts), timeout=540)


def _store_containers(client: Any, store: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_STORE}={store}"}))


@pytest.mark.ray
def test_docker_stores_wait_for_a_trusted_data_node_and_never_use_an_untrusted_one(
    dockerd: Dockerd, ray_cluster: Cluster
) -> None:
    ports = {
        store: free_port(ray_cluster.ip, span=2) for store in STORES
    }  # a process-runtime test may hold the defaults
    _phase(
        ray_cluster,
        f"""
        from ray.util.state import list_actors
        for store, port in {ports!r}.items():
            supervisor.ensure(store, runtime="docker", port=port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {{a.name: a.state for a in list_actors(filters=[("ray_namespace", "=", "rma")])}}
            if all(states.get("rma-store-" + s) == "PENDING_CREATION" for s in {STORES!r}):
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"supervisors not pending: {{states}}")
        print("{{}}")
    """,
    )
    client = dockerd.client()
    assert not [
        c.name for s in STORES for c in _store_containers(client, s)
    ]  # nothing ran on the untrusted node
    ray_cluster.add_node(
        "trusted", {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "trusted"}
    )
    ready = _phase(
        ray_cluster,
        f"""
        print(json.dumps({{s: wait(s, lambda st: st["status"] == "ready") for s in {STORES!r}}}))
    """,
    )
    for store, st in ready.items():
        assert st["runtime"] == "docker" and st["labels"]["rma.io/node"] == "trusted"
        assert st["labels"]["rma.io/trusted"] == "true" and st["labels"]["rma.io/tier"] == "data"
        assert st["port"] == ports[store]
        print(
            f"\n[docker] {store} under its supervisor (4 stores at once): start -> ready {st['ready_s']:.2f} s"
        )
        (ctr,) = _store_containers(client, store)
        assert ctr.labels[LABEL_VOLUME] == str(ray_cluster.stores / "trusted" / store)
        assert ctr.attrs["State"]["Pid"] == st["pid"]
    client.close()


@pytest.mark.ray
@pytest.mark.parametrize("store", STORES)
def test_1000_records_survive_a_supervisor_crash_and_a_container_death(
    dockerd: Dockerd, ray_cluster: Cluster, store: str
) -> None:
    client = dockerd.client()
    first = _phase(
        ray_cluster,
        f"ep = supervisor.endpoint({store!r})",
        WRITE[store],
        f"print(json.dumps({{'acked': acked, 'st': status({store!r})}}))",
    )
    assert first["acked"] == 1000
    before = first["st"]
    (ctr,) = _store_containers(client, store)
    # what a supervisor that crashed mid-way leaves behind: a labelled one-shot container on this store's volume
    orphan = client.containers.run(
        ctr.image.id,
        ["infinity"],
        entrypoint=["sleep"],
        detach=True,
        network_mode="none",
        labels={
            LABEL_STORE: store,
            LABEL_VOLUME: ctr.labels[LABEL_VOLUME],
            LABEL_SUPERVISOR: "a-crashed-incarnation",
            LABEL_ROLE: "init",
        },
    )
    # 1. the supervisor actor dies; Ray restarts it; it adopts the running store container and removes the orphan
    crash = _phase(
        ray_cluster,
        f"""
        ray.kill(ray.get_actor("rma-store-{store}", namespace="rma"), no_restart=False)
        after = wait({store!r}, lambda st: st["supervisor_pid"] != {before["supervisor_pid"]}
                     and st["status"] == "ready")
        ep = supervisor.endpoint({store!r})
    """,
        COUNT[store],
        "print(json.dumps({'st': after, 'n': n}))",
    )
    after = crash["st"]
    assert after["adopted"] and after["pid"] == before["pid"]
    assert [c.id for c in _store_containers(client, store)] == [ctr.id]  # the orphan is gone, the store kept
    assert not client.containers.list(all=True, filters={"id": orphan.id})
    assert crash["n"] == 1000
    # 2. the store's container dies hard: the supervisor starts a new one on the same volume
    death = _phase(
        ray_cluster,
        f"""
        os.kill({after["pid"]}, signal.SIGKILL)
        again = wait({store!r}, lambda st: st["status"] == "ready" and st["pid"] != {after["pid"]})
        ep = supervisor.endpoint({store!r})
    """,
        COUNT[store],
        "print(json.dumps({'st': again, 'n': n}))",
    )
    (new,) = _store_containers(client, store)
    assert new.id != ctr.id and new.attrs["State"]["Pid"] == death["st"]["pid"]
    assert death["n"] == 1000
    client.close()


LATE = {  # 100 records written after the backup: the restore must take them away again
    "redis": """
        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        r.mset({f"late:{i}": "after the backup" for i in range(100)})
    """,
    "postgres": """
        with psycopg.connect(ep.url(), autocommit=True) as c:
            c.execute("INSERT INTO recs SELECT g, 'late' FROM generate_series(1000, 1099) g")
    """,
    "chroma": """
        col.upsert(ids=[f"late-{i}" for i in range(100)], documents=["late"] * 100,
                   embeddings=[[1.0, 2.0, float(i)] for i in range(100)])
    """,
    "graph": """
        with GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d, d.session(database=ep.database) as s:
            for i in range(1000, 1100):
                s.run("CREATE (:Rec {id: $id, v: 'late'})", id=i).consume()
    """,
}
TOTAL = {  # every record the store holds (COUNT counts the 1,000 acknowledged ones with their values)
    "redis": "total = r.dbsize()",
    "postgres": """
        with psycopg.connect(ep.url()) as c:
            total = c.execute("SELECT count(*) FROM recs").fetchone()[0]
    """,
    "chroma": "total = col.count()",
    "graph": """
        with GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d, d.session(database=ep.database) as s:
            total = s.run("MATCH (r:Rec) RETURN count(r) AS n").single()["n"]
    """,
}
MANIFEST_COUNTS = {
    "redis": {"db0.keys": 1000},
    "postgres": {"public.recs": 1000},
    "chroma": {"recs": 1000},
    "graph": {"nodes": 1000, "relationships": 0},
}
RESTORED = {"redis": ["appendonlydir", "dump.rdb"], "chroma": ["chroma"], "graph": ["arcadedb/databases"]}


@pytest.mark.ray
@pytest.mark.parametrize("store", STORES)
def test_backup_and_restore_under_docker_keep_exactly_the_acknowledged_records(
    dockerd: Dockerd, ray_cluster: Cluster, store: str, tmp_path: Path
) -> None:
    """`rma stores backup` (the same supervisor calls, in the driver), 100 records more, `rma stores restore`:
    exactly the 1,000 acknowledged before the backup are there; the manifest has the process runtime's shape
    and the store's counts; the file is the same format as under the process runtime (an owner-neutral tar,
    an RDB, a pg_dump archive); what the restore wrote into the bind mount is the image's uid's."""
    if "trusted" not in ray_cluster.nodes:  # run alone
        ray_cluster.add_node(
            "trusted", {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "trusted"}
        )
    dest = tmp_path / "backup"
    port = free_port(ray_cluster.ip, span=2)  # when this test creates the supervisor: not a default port

    def block(code: str, indent: str = "") -> str:
        return textwrap.indent(textwrap.dedent(code).strip("\n"), indent)

    script = "\n".join(
        [
            "from rma_ray.cli import app",
            f"supervisor.ensure({store!r}, runtime='docker', port={port})",
            f"ep = supervisor.endpoint({store!r})",
            "try:",
            block(COUNT[store], "    "),
            "except Exception:",
            "    n = 0",
            "if n != 1000:  # run alone: the 1,000 acknowledged records are not there yet",
            block(WRITE[store], "    "),
            f"app(['stores', 'backup', {store!r}, {str(dest)!r}], standalone_mode=False)",
            block(COUNT[store]),
            block(LATE[store]),
            block(TOTAL[store]),
            "before = total",
            f"app(['stores', 'restore', {store!r}, {str(dest)!r}], standalone_mode=False)",
            f"ep = supervisor.endpoint({store!r})",
            block(COUNT[store]),
            block(TOTAL[store]),
            f"print(json.dumps({{'before': before, 'n': n, 'total': total, 'st': status({store!r})}}))",
        ]
    )
    got = _phase(ray_cluster, script)
    assert got["before"] == 1100, got  # the late records were there until the restore
    assert got["n"] == 1000 and got["total"] == 1000, got
    assert got["st"]["status"] == "ready" and got["st"]["runtime"] == "docker"

    manifest = json.loads((dest / "manifest.json").read_text())
    data = dest / manifest["file"]
    assert set(manifest) == {
        "format_version",
        "store",
        "format",
        "store_version",
        "runtime",
        "created_at",
        "size_bytes",
        "sha256",
        "counts",
        "file",
    }
    assert (manifest["store"], manifest["runtime"]) == (store, "docker")
    assert manifest["counts"] == MANIFEST_COUNTS[store]
    assert not manifest["store_version"].startswith("unknown"), manifest["store_version"]
    assert manifest["size_bytes"] == data.stat().st_size
    if store in ("chroma", "graph"):
        with tarfile.open(data) as tar:
            members = tar.getmembers()
        top = {"chroma": "chroma", "graph": "arcadedb/databases"}[store]
        assert members[0].name == top and all(m.name.startswith(top) for m in members)
        assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    else:
        assert data.read_bytes()[:5] == {"redis": b"REDIS", "postgres": b"PGDMP"}[store]

    files = ray_cluster.stores / "trusted" / store / "container"
    assert (files.stat().st_uid, files.stat().st_mode & 0o777) == (999, 0o700)
    for rel in RESTORED.get(store, []):
        top = files / rel
        assert top.stat().st_mode & 0o777 == (0o700 if top.is_dir() else 0o600), rel
        owners = {p.stat().st_uid for p in [top, *(top.rglob("*") if top.is_dir() else [])]}
        assert owners == {999}, (rel, owners)
