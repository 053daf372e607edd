"""Start-to-ready and recovery times of the data stores under their Ray supervisors (process runtime).

    cd /work/main && timeout 1200 .venv/bin/python -m bench.stores            # about 4 min on 2 cores
    cd /work/main && timeout 1200 .venv/bin/python -m bench.stores redis postgres

A real token-auth Ray cluster on this machine: a head (fast health checks, as `rma up` runs it) and one trusted
data node. For each store, in seconds:

* start: `supervisor.ensure()` to the endpoint answering (a real query: PING, SELECT 1, Chroma's collection list,
  Bolt `RETURN 1`), measured by this driver; `ready_s` is the supervisor's own figure (store process start to
  first answered query, without Ray's actor start).
* actor kill: `ray.kill(no_restart=False)` of the supervisor -> the store answers again (Ray restarts the actor;
  it kills the dead worker's children, so the new supervisor restarts the store on the same volume).
* node kill: SIGKILL of the data node's raylet -> a replacement node with the same labels and stores dir is
  started at once (what `rma join`'s agent does) -> the store answers again. Includes Ray's death detection
  (about 3-4 s with these health checks) and the new node's start.
* records: 1,000 written before the kills and counted after (must be 1,000; the bench says so if not).

Prints a table; asserts nothing about time. The docker runtime's figures: `python -m bench.stores_docker`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from rma_ray.net import local_ip_towards, port_free
from rma_ray.raynode import FAST_HEALTH_CHECKS, NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.support.records import count, write_1000

STORES = ("redis", "postgres", "chroma", "graph")


def endpoint_again(store: str, timeout: float = 300) -> Any:
    """The endpoint once the store answers again; right after a kill, calls may fail until Ray restarts the
    supervisor, so keep asking."""
    import ray

    from deployments.stores import supervisor

    deadline = time.monotonic() + timeout
    while True:
        try:
            return supervisor.endpoint(store, 60)
        except (ray.exceptions.RayError, ValueError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{store} did not come back within {timeout:.0f} s: {exc}") from None
            time.sleep(0.2)


def main(stores: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="rma-bench-stores-"))
    root.chmod(0o755)  # the postgres user must traverse the volumes
    token = root / "cluster_token"
    read_or_create_secret(token)
    os.environ.update(ray_env(token))  # before `import ray`: this process is the driver
    ip = local_ip_towards("192.0.2.1")
    port = next(p for p in range(46400, 46500) if port_free(ip, p))
    dash = next(p for p in range(48300, 48400) if port_free(ip, p))
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir("bench-st-head"),
            labels={"rma.io/tier": "head"},
            gcs_port=port,
            dashboard_port=dash,
            num_cpus=0,
            env=FAST_HEALTH_CHECKS,
        ),
        root / "head.log",
    )
    data_labels = {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "bench"}
    nodes: list[RayNode] = [head]

    def data_node(n: int) -> RayNode:
        node = RayNode(
            NodeSpec(
                node_ip=ip,
                token_file=token,
                temp_dir=short_temp_dir(f"bench-st-data{n}"),
                labels=data_labels,
                address=f"{ip}:{port}",
                num_cpus=1,
                env={"RMA_STORES_DIR": str(root / "stores")},
            ),
            root / f"data{n}.log",
        )
        node.start()
        node.wait_started(120)
        nodes.append(node)
        return node

    rows: list[dict[str, Any]] = []
    try:
        head.start()
        head.wait_started(120)
        node = data_node(0)
        import ray

        from deployments.stores import supervisor

        ray.init(address=f"{ip}:{port}", logging_level="ERROR", log_to_driver=False)
        for n, store in enumerate(stores):
            row: dict[str, Any] = {"store": store}
            t0 = time.monotonic()
            actor = supervisor.ensure(store)
            ep = supervisor.endpoint(store, 240)
            row["start"] = time.monotonic() - t0
            row["ready_s"] = ray.get(actor.status.remote())["ready_s"]
            written = write_1000(store, ep)
            t0 = time.monotonic()
            ray.kill(actor, no_restart=False)
            ep = endpoint_again(store)
            row["actor kill"] = time.monotonic() - t0
            raylet = next(
                p for p in psutil.Process(node.pid).children(recursive=True) if p.name() == "raylet"
            )
            t0 = time.monotonic()
            raylet.kill()
            node.stop(timeout=10)
            shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
            node = data_node(n + 1)
            ep = endpoint_again(store)
            row["node kill"] = time.monotonic() - t0
            row["records"] = f"{count(store, ep)}/{written}"
            rows.append(row)
            print(f"  {store}: {row}", flush=True)
        for store in stores:
            a = ray.get_actor(supervisor.actor_name(store), namespace=supervisor.NAMESPACE)
            ray.get(a.stop.remote(), timeout=60)
            ray.kill(a, no_restart=True)
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules[
                "ray"
            ].shutdown()  # before the nodes go: a connected driver aborts when its GCS vanishes
        for nd in reversed(nodes):
            nd.stop(timeout=20)
            shutil.rmtree(nd.spec.temp_dir, ignore_errors=True)
        for pidfile in (root / "stores").glob("*/.rma-pid.json"):  # a store whose supervisor never stopped it
            try:
                psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
            except (psutil.Error, OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nstores under Ray supervisors, process runtime, {os.cpu_count()} CPUs (seconds)")
    print(f"{'store':10} {'start':>7} {'ready_s':>8} {'actor kill':>11} {'node kill':>10} {'records':>10}")
    for r in rows:
        print(
            f"{r['store']:10} {r['start']:7.1f} {r['ready_s']:8.1f} {r['actor kill']:11.1f} {r['node kill']:10.1f} "
            f"{r['records']:>10}"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(STORES))
