"""`rma stores move` of a store holding SIZE MB, per store (process runtime): the time from the command to the
store answering on the new donor with its counts checked, and its parts (freeze + backup + download, the
switch and restore, from the CLI's own steps), as MB/s.

    cd /work/main && timeout 3000 flock /tmp/rma-heavy.lock .venv/bin/python -m bench.store_move --mb 1024
    cd /work/main && .venv/bin/python -m bench.store_move --mb 256 redis postgres

A real token-auth Ray cluster on this machine: a head and two trusted data nodes (`bench-a`, `bench-b`, each with
its own stores dir: a move copies the data for real, through the CLI's driver as it would between two machines).
Each store is filled with about SIZE MB of its own kind of records (PostgreSQL rows of 1 KiB, Redis values of
64 KiB, Chroma documents of 8 KiB with 3-dimensional embeddings, graph nodes with an 8 KiB property), moved
from the donor it landed on to the other, and counted there. Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rma_ray.net import local_ip_towards, port_free
from rma_ray.raynode import FAST_HEALTH_CHECKS, NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret

STORES = ("redis", "postgres", "chroma", "graph")
KIB = 1024


def fill(store: str, ep: Any, mb: int) -> int:
    """About `mb` MB of records; returns how many."""
    if store == "postgres":
        import psycopg

        n = mb * KIB  # rows of 1 KiB
        with psycopg.connect(ep.url(), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS filler (id int PRIMARY KEY, v text)")
            for start in range(0, n, 100_000):
                c.execute(
                    "INSERT INTO filler SELECT g, repeat(md5(g::text), 32) FROM generate_series(%s::int, %s::int) g",
                    (start, min(n, start + 100_000) - 1),
                )
        return n
    if store == "redis":
        import redis

        n = mb * KIB // 64  # values of 64 KiB
        value = os.urandom(48 * KIB).hex()[: 64 * KIB].encode()
        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=120) as r:
            for start in range(0, n, 256):
                p = r.pipeline(transaction=False)
                for i in range(start, min(n, start + 256)):
                    p.set(f"filler:{i}", value)
                p.execute()
        return n
    if store == "chroma":
        import chromadb

        n = mb * KIB // 8  # documents of 8 KiB
        col = chromadb.HttpClient(host=ep.host, port=ep.port).get_or_create_collection(
            "filler", embedding_function=None
        )
        doc = "x" * (8 * KIB)
        for start in range(0, n, 500):
            ids = range(start, min(n, start + 500))
            col.upsert(
                ids=[f"f-{i}" for i in ids],
                documents=[doc] * len(ids),
                embeddings=[[float(i % 7), float(i % 11), 1.0] for i in ids],
            )
        return n
    from neo4j import GraphDatabase

    n = mb * KIB // 8  # nodes with an 8 KiB property
    with (
        GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d,
        d.session(database=ep.database) as s,
    ):
        for start in range(0, n, 500):
            s.run(
                "UNWIND range($a, $b) AS i CREATE (:Filler {id: i, v: $v})",
                a=start,
                b=min(n, start + 500) - 1,
                v="y" * (8 * KIB),
            ).consume()
    return n


def main(stores: list[str], mb: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="rma-bench-move-"))
    root.chmod(0o755)  # the postgres user must traverse the volumes
    token = root / "cluster_token"
    read_or_create_secret(token)
    os.environ.update(ray_env(token))  # before `import ray`: this process is the driver
    os.environ["RMA_DATA_DIR"] = str(root / "pool")  # where the CLI keeps the stores' pins
    (root / "pool").mkdir(mode=0o700)
    ip = local_ip_towards("192.0.2.1")
    port = next(p for p in range(46500, 46600) if port_free(ip, p))
    dash = next(p for p in range(48400, 48500) if port_free(ip, p))
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir("bench-mv-head"),
            labels={"rma.io/tier": "head"},
            gcs_port=port,
            dashboard_port=dash,
            num_cpus=0,
            env=FAST_HEALTH_CHECKS,
        ),
        root / "head.log",
    )
    nodes: list[RayNode] = [head]
    rows: list[dict[str, Any]] = []
    try:
        head.start()
        head.wait_started(120)
        for key in ("bench-a", "bench-b"):
            node = RayNode(
                NodeSpec(
                    node_ip=ip,
                    token_file=token,
                    temp_dir=short_temp_dir(f"bench-mv-{key}"),
                    labels={"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": key},
                    address=f"{ip}:{port}",
                    num_cpus=1,
                    env={"RMA_STORES_DIR": str(root / "stores" / key)},
                ),
                root / f"{key}.log",
            )
            node.start()
            node.wait_started(120)
            nodes.append(node)
        import ray

        from deployments.stores import supervisor
        from rma_ray.cli import app

        ray.init(address=f"{ip}:{port}", namespace="rma", logging_level="ERROR", log_to_driver=False)
        for store in stores:
            actor = supervisor.ensure(store)
            ep = supervisor.endpoint(store, 240)
            t0 = time.monotonic()
            n = fill(store, ep, mb)
            filled = time.monotonic() - t0
            st = ray.get(actor.status.remote())
            size = st["size_bytes"]
            to = "bench-b" if st["donor"] == "bench-a" else "bench-a"
            print(f"  {store}: {n} records, volume {size / 1e6:.0f} MB (filled in {filled:.0f} s) -> {to}")
            t0 = time.monotonic()
            app(["stores", "move", store, "--to", to], standalone_mode=False)
            moved = time.monotonic() - t0
            st = ray.get(supervisor.ensure(store).status.remote())
            assert st["donor"] == to and st["status"] == "ready", st
            rows.append({"store": store, "records": n, "mb": size / 1e6, "move": moved})
            print(f"  {store}: moved in {moved:.1f} s", flush=True)
        for store in stores:
            a = ray.get_actor(supervisor.actor_name(store), namespace=supervisor.NAMESPACE)
            ray.get(a.stop.remote(), timeout=120)
            ray.kill(a, no_restart=True)
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        for nd in reversed(nodes):
            nd.stop(timeout=30)
            shutil.rmtree(nd.spec.temp_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n`rma stores move` (process runtime, two data nodes on one box, {os.cpu_count()} CPUs)")
    print(f"{'store':10} {'records':>9} {'volume MB':>10} {'move s':>8} {'MB/s':>7}")
    for r in rows:
        print(
            f"{r['store']:10} {r['records']:9d} {r['mb']:10.0f} {r['move']:8.1f} {r['mb'] / r['move']:7.1f}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="*", default=list(STORES))
    ap.add_argument("--mb", type=int, default=1024, help="about how much each store holds before its move")
    args = ap.parse_args()
    main(args.stores, args.mb)
