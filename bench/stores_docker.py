"""Data stores under the docker runtime (needs root, docker.io and debootstrap; starts its own private dockerd).

    .venv/bin/python -m bench.stores_docker                    # start-to-ready, ~2 min on 2 cores
    .venv/bin/python -m bench.stores_docker recovery [stores]  # under Ray supervisors, ~4 min on 2 cores

* default: start-to-ready per store (first start on an empty volume, restart on the kept volume), the process
  runtime measured the same way in the same process as the baseline; image sizes; what the private dockerd and
  the image build script cost (cold when its data root is empty: RMA_TEST_DOCKER_ROOT=/some/empty/dir).
* recovery: bench.stores' procedure with runtime="docker": a real token-auth Ray cluster (head with fast health
  checks, one trusted data node); per store: ensure() to the endpoint answering, then actor kill -> answering
  again (the new supervisor adopts the running container), then SIGKILL of the data node's raylet and a
  replacement node -> answering again (the container outlives the node; the supervisor on the new node adopts
  it), and the 1,000 records written before the kills counted after.

Prints figures; asserts nothing about time.
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

from bench.stores import STORES, count, write_1000
from rma_ray.net import local_ip_towards, port_free
from rma_ray.raynode import FAST_HEALTH_CHECKS, NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.docker_support import bench_docker, missing, private_dockerd


def _endpoint(store: str, timeout: float = 240) -> Any:
    """The endpoint once the (possibly restarting) supervisor answers: a call that reaches the dying worker fails
    with an actor error instead of waiting for the restart, so ask again."""
    import ray

    from deployments.stores import supervisor

    deadline = time.monotonic() + timeout
    while True:
        try:
            return supervisor.endpoint(store, max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.RayError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def recovery(stores: list[str]) -> list[dict[str, Any]]:
    reason = missing()
    if reason:
        raise SystemExit(f"bench.stores_docker: {reason}")
    root = Path(tempfile.mkdtemp(prefix="rma-bench-stores-docker-"))
    root.chmod(0o755)
    token = root / "cluster_token"
    read_or_create_secret(token)
    rows: list[dict[str, Any]] = []
    with private_dockerd() as d:
        os.environ["DOCKER_HOST"] = d.host  # Ray nodes started below inherit it
        os.environ.update(ray_env(token))  # before `import ray`: this process is the driver
        ip = local_ip_towards("192.0.2.1")
        port = next(p for p in range(46500, 46600) if port_free(ip, p))
        dash = next(p for p in range(48400, 48500) if port_free(ip, p))
        head = RayNode(
            NodeSpec(
                node_ip=ip,
                token_file=token,
                head=True,
                temp_dir=short_temp_dir("bench-sd-head"),
                labels={"rma.io/tier": "head"},
                gcs_port=port,
                dashboard_port=dash,
                num_cpus=0,
                env=FAST_HEALTH_CHECKS,
            ),
            root / "head.log",
        )
        labels = {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "bench"}
        nodes: list[RayNode] = [head]

        def data_node(n: int) -> RayNode:
            node = RayNode(
                NodeSpec(
                    node_ip=ip,
                    token_file=token,
                    temp_dir=short_temp_dir(f"bench-sd-data{n}"),
                    labels=labels,
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

        try:
            head.start()
            head.wait_started(120)
            node = data_node(0)
            import ray

            from deployments.stores import supervisor

            ray.init(address=f"{ip}:{port}", logging_level="ERROR", log_to_driver=False)
            for n, store in enumerate(stores):
                free = next(
                    p for p in range(47100 + 10 * n, 47200) if port_free(ip, p) and port_free(ip, p + 1)
                )
                row: dict[str, Any] = {"store": store}
                t0 = time.monotonic()
                actor = supervisor.ensure(store, runtime="docker", port=free)
                ep = _endpoint(store)
                row["start"] = time.monotonic() - t0
                st = ray.get(actor.status.remote())
                row["ready_s"], first_pid = st["ready_s"], st["pid"]
                written = write_1000(store, ep)
                print(f"  {store}: ready, {written} written", flush=True)
                t0 = time.monotonic()
                ray.kill(actor, no_restart=False)
                time.sleep(0.5)  # let Ray see the death before asking the (restarting) actor
                ep = _endpoint(store)
                row["actor kill"] = time.monotonic() - t0
                print(f"  {store}: back after the actor kill", flush=True)
                raylet = next(
                    p for p in psutil.Process(node.pid).children(recursive=True) if p.name() == "raylet"
                )
                t0 = time.monotonic()
                raylet.kill()
                node.stop(timeout=10)
                shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
                node = data_node(n + 1)
                ep = _endpoint(store)
                row["node kill"] = time.monotonic() - t0
                st = ray.get(supervisor.ensure(store).status.remote())
                row["same container"] = st["pid"] == first_pid
                row["records"] = f"{count(store, ep)}/{written}"
                rows.append(row)
                print(f"  {store}: {row}", flush=True)
            for store in stores:
                a = ray.get_actor(supervisor.actor_name(store), namespace=supervisor.NAMESPACE)
                ray.get(a.stop.remote(), timeout=90)
                ray.kill(a, no_restart=True)
        finally:
            if "ray" in sys.modules:
                sys.modules[
                    "ray"
                ].shutdown()  # before the nodes go: a driver that loses its GCS aborts the process
            keep = os.environ.get("RMA_BENCH_KEEP")  # keep the Ray logs to look at a failed run
            for nd in reversed(nodes):
                nd.stop(timeout=20)
                if not keep:
                    shutil.rmtree(nd.spec.temp_dir, ignore_errors=True)
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
    print(f"\nstores under Ray supervisors, docker runtime, {os.cpu_count()} CPUs (seconds)")
    print(
        f"{'store':10} {'start':>7} {'ready_s':>8} {'actor kill':>11} {'node kill':>10} {'same ctr':>9} "
        f"{'records':>10}"
    )
    for r in rows:
        print(
            f"{r['store']:10} {r['start']:7.1f} {r['ready_s']:8.1f} {r['actor kill']:11.1f} {r['node kill']:10.1f} "
            f"{r['same container']!s:>9} {r['records']:>10}"
        )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["recovery"]:
        recovery(sys.argv[2:] or list(STORES))
    else:
        print(json.dumps(bench_docker(), indent=2))
