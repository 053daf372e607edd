"""What the WireGuard overlay costs, and how fast revocation cuts a donor off. Prints figures; asserts nothing.

One run, two pools on this machine's network namespaces (the head a namespace of its own, two donors):
first with `rma up --overlay` and the donors behind NAT, then without an overlay on plain veth (direct). In each:
latency and throughput of a Serve request (client -> head proxy -> replica on donor A), and a 50 MB object made
on donor A and read by a task on donor B (through the hub on the overlay). Then, on the overlay pool, the time
from the revoke request to the end of B's overlay traffic, and to Ray declaring B dead.

    sudo .venv/bin/python -m bench.overlay            (root: namespaces, WireGuard, nftables; ~4 min)
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from rma_ray import overlay
from tests.e2e.netns import TestBed, available
from tests.e2e.overlay_bed import PORTS, OverlayPool, nat, start_pool
from tests.support import wait_for

APP = """
import ray, time
from ray import serve
ray.init(address="auto", namespace="rma", logging_level="ERROR")

@serve.deployment(max_ongoing_requests=64,
                  ray_actor_options={{"num_cpus": 0.1, "label_selector": {{"rma.io/node": "{a}"}}}})
class Echo:
    def __call__(self, request):
        return "ok"

serve._run(Echo.bind(), name="echo", route_prefix="/echo", _blocking=False)
deadline = time.time() + 180
while time.time() < deadline and serve.status().applications["echo"].status != "RUNNING":
    time.sleep(0.5)
print(serve.status().applications["echo"].status)
"""

OBJECT = """
import ray, time, numpy as np
ray.init(address="auto", namespace="rma", logging_level="ERROR")

@ray.remote(num_cpus=0.1)
def make(n):
    return np.ones(n, dtype=np.uint8)

@ray.remote(num_cpus=0.1)
def take(x):
    return int(x[-1]) + x.nbytes

on_a = make.options(label_selector={{"rma.io/node": "{a}"}})
on_b = take.options(label_selector={{"rma.io/node": "{b}"}})
ray.get(on_b.remote(on_a.remote(1)))  # warm both workers
times = {{}}
for n in (1, 50 * 1024 * 1024):
    runs = []
    for _ in range(3):
        ref = on_a.remote(n)
        ray.wait([ref], fetch_local=False)
        t = time.perf_counter()
        assert ray.get(on_b.remote(ref)) == n + 1
        runs.append(time.perf_counter() - t)
    times[n] = min(runs)
print("SMALL", times[1], "BIG", times[50 * 1024 * 1024])
"""


def serve_figures(pool: OverlayPool) -> dict[str, float]:
    url = f"{pool.info['serve_url']}/echo"
    with httpx.Client(timeout=10) as http:
        for _ in range(20):
            http.get(url).raise_for_status()
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            http.get(url).raise_for_status()
            lat.append(time.perf_counter() - t)
    done, stop = [0], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                if c.get(url).status_code == 200:
                    done[0] += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(10)  # a fixed measuring window: this is a bench, not a test
    stop.set()
    for t in threads:
        t.join()
    lat.sort()
    return {
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[int(0.95 * len(lat))],
        "rps": done[0] / (time.perf_counter() - t0),
    }


def object_figures(pool: OverlayPool, a: str, b: str) -> dict[str, float]:
    r = pool.driver(OBJECT.format(a=a, b=b))
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    small, big = float(words[words.index("SMALL") + 1]), float(words[words.index("BIG") + 1])
    return {"small_s": small, "big_s": big, "mbit_s": 50 * 8 * 1.048576 / max(big - small, 1e-6)}


def one_pool(use_overlay: bool) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="rma-bench-ov-") as tmp,
        TestBed(3, prefix="rmbo") as bed,
        start_pool(bed, Path(tmp), use_overlay=use_overlay) as pool,
    ):
        a_host, b_host = bed.hosts[1], bed.hosts[2]
        if use_overlay:
            nat(a_host)
            nat(b_host)
        a = pool.wait_joined(pool.start_join(a_host, pool.invite(tier="service")))
        b = pool.wait_joined(pool.start_join(b_host, pool.invite(tier="service")))
        r = pool.driver(APP.format(a=a.worker_id))
        assert "RUNNING" in r.stdout, r.stdout + r.stderr[-3000:]
        out: dict[str, Any] = {
            "serve": serve_figures(pool),
            "object": object_figures(pool, a.worker_id, b.worker_id),
        }
        if use_overlay:
            ip = pool.worker(b.worker_id)["overlay_ip"]
            target = [(ip, PORTS.node_manager)]
            assert pool.head_helper.reachable(target) == set(target)
            t0 = time.perf_counter()
            pool.admin("POST", f"/api/admin/workers/{b.worker_id}/revoke").raise_for_status()
            t_return = time.perf_counter() - t0
            wait_for(
                lambda: pool.head_helper.reachable(target, timeout=0.02) == set(), timeout=10, interval=0.0
            )
            t_cut = time.perf_counter() - t0
            wait_for(lambda: pool.node_of(b.worker_id, "DEAD"), timeout=120, interval=0.1)
            t_dead = time.perf_counter() - t0
            out["revoke"] = {"request_s": t_return, "cutoff_s": t_cut, "ray_dead_s": t_dead}
        return out


def main() -> None:
    reason = available() or overlay.missing_tools()
    if reason:
        raise SystemExit(f"bench.overlay needs: {reason}")
    print("overlay pool (donors behind NAT, userspace WireGuard) …", flush=True)
    ov = one_pool(True)
    print("direct pool (plain veth) …", flush=True)
    direct = one_pool(False)
    print()
    print(f"{'':36}{'overlay':>12}{'direct':>12}{'ratio':>8}")
    rows = [
        ("Serve request p50 (ms)", ov["serve"]["p50_ms"], direct["serve"]["p50_ms"]),
        ("Serve request p95 (ms)", ov["serve"]["p95_ms"], direct["serve"]["p95_ms"]),
        ("Serve throughput, 8 clients (req/s)", ov["serve"]["rps"], direct["serve"]["rps"]),
        ("object 1 B, A->B task (s)", ov["object"]["small_s"], direct["object"]["small_s"]),
        ("object 50 MB, A->B task (s)", ov["object"]["big_s"], direct["object"]["big_s"]),
        ("50 MB transfer rate (Mbit/s)", ov["object"]["mbit_s"], direct["object"]["mbit_s"]),
    ]
    for name, o, d in rows:
        print(f"{name:36}{o:12.3f}{d:12.3f}{o / d:8.2f}")
    rv = ov["revoke"]
    print(
        f"\nrevoke: admin request returned in {rv['request_s'] * 1000:.0f} ms; overlay traffic to the donor "
        f"stopped {rv['cutoff_s'] * 1000:.0f} ms after the request was sent; Ray declared the node dead after "
        f"{rv['ray_dead_s']:.1f} s (health checks 1 s / 2 s / 3)"
    )


if __name__ == "__main__":
    main()
