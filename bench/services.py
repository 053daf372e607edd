"""The gateway's overhead: its no-op route (`GET /api/whoami`: client-key check, per-client limiter, request id,
metrics) through Ray Serve, against the same FastAPI app on plain uvicorn, at 16 and 64 connections. Plain uvicorn
stays up and is measured right before each Serve case at each connection count, so every ratio compares two runs
seconds apart on this shared box. Load comes from `wrk` (Debian package). Prints rps and p50/p99, each Serve case
as a ratio of plain uvicorn, and the load average. Nothing is asserted.

    .venv/bin/python -m bench.services --part gateway [--seconds 10] [--cases python,haproxy-1,pool]
                                       [--uvicorn-workers]

Cases (CASES below): Serve's Python proxy (its default) and HAProxy mode (`rma_ray.serve_admin`, the pool's
default), with one or two gateway replicas, with Serve's per-request HTTP metrics from HAProxy's log or from the
replica. `pool` is exactly what `rma up` starts. `--uvicorn-workers` adds plain uvicorn with two workers.
Client metering and quotas (deployments/gateway/quota.py; the bench key has a quota that never refuses, so the
limiter and the day's counters run): `pool` meters in each replica's memory (no Redis store: fail-open),
`pool-redis` in the pool's Redis store (a supervised redis-server on the head, as `rma up` runs it),
`pool-meter-off` not at all (RMA_METER=off); with both, the metering ratio is printed:

    .venv/bin/python -m bench.services --part gateway --cases pool-meter-off,pool-redis,pool [--quota-rpm 0]

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from deployments.services.settings import ServicesSettings
from rma_ray import credentials
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.serve_admin import HAPROXY_ENV, INGRESS_REPLICA_ENV
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
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-H",
            f"Authorization: Bearer {key}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(lat["50"]),
        "p99_ms": _ms(lat["99"]),
        "errors": int(errors.group(1)) if errors else 0,
    }


def coordinator(root: Path, ip: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    admin = credentials.mint(credentials.Kind.ADMIN).token
    port = free_port(ip)
    env = {**os.environ, "RMA_ADMIN_KEY": admin, "RMA_DATA_DIR": str(root / "coord")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rma_ray.cli", "admission", "serve", "--host", ip, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{ip}:{port}"
    wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=60, what="coordinator")
    key = httpx.post(
        url + "/api/admin/clients", json={"name": "bench"}, headers={"Authorization": f"Bearer {admin}"}
    ).json()["key"]
    cred = root / "keyring-credential"
    cred.write_text(admin)
    cred.chmod(0o600)
    return proc, url, key, cred


# Serve configurations: the proxy (rma_ray.serve_admin.start), more env of Serve's controller (HAProxy's manager
# and the fallback proxy inherit it), the gateway replicas' env (ServicesSettings.ingress_env) and other gateway
# settings. "pool" is exactly what `rma up` runs.
ONE = {
    "gateway": {
        "max_ongoing_requests": 256,
        "max_queued_requests": 512,
        "min_replicas": 1,
        "max_replicas": 1,
        "target_ongoing_requests": 64,
    }
}
TWO = {"gateway": {**ONE["gateway"], "min_replicas": 2, "max_replicas": 2}}
TUNED = {k: v for k, v in INGRESS_REPLICA_ENV.items() if k not in HAPROXY_ENV}
METRICS_ON = {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"}
CASES: dict[str, tuple[str, dict[str, str], dict[str, str], dict[str, Any]]] = {
    "python": ("python", {}, {}, ONE),  # Serve's default: its Python proxy, handle calls to the replica
    "python-tuned": ("python", {}, TUNED, {**ONE, "access_log": False}),
    "python-2": ("python", {}, TUNED, {**TWO, "access_log": False}),
    "haproxy-1": ("haproxy", {}, INGRESS_REPLICA_ENV, ONE),
    "haproxy-1-metrics": ("haproxy", METRICS_ON, {**INGRESS_REPLICA_ENV, **METRICS_ON}, ONE),
    "haproxy-2-metrics": ("haproxy", METRICS_ON, {**INGRESS_REPLICA_ENV, **METRICS_ON}, TWO),
    "pool": ("haproxy", {}, INGRESS_REPLICA_ENV, {}),
    "pool-redis": ("haproxy", {}, INGRESS_REPLICA_ENV, {}),
    "pool-meter-off": ("haproxy", {}, {**INGRESS_REPLICA_ENV, "RMA_METER": "off"}, {}),
}
WITH_REDIS = {"pool-redis"}  # the pool's Redis store runs: client quotas are shared


def serve_case(
    root: Path, ip: str, env: dict[str, str], case: str, key: str, measure: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    token = root / "cluster_token"
    read_or_create_secret(token)
    gcs, http_port = free_port(ip), free_port(ip)
    proxy, controller_env, ingress_env, overrides = CASES[case]
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"bsv-{os.getpid()}"),
            labels={"rma.io/tier": "service"},
            gcs_port=gcs,
            dashboard_port=free_port(ip),
            num_cpus=2,
            drain_timeout_s=2,
            env=env,
        ),
        root / f"head-{case}.log",
    )
    head.start()
    try:
        head.wait_started(180)
        script = textwrap.dedent("""
            import ray
            from ray import serve
            from deployments.services.app import Gateway, _options
            from deployments.services.settings import ServicesSettings
            from rma_ray import serve_admin
            ray.init(logging_level="ERROR", namespace="rma")
            if %r:
                from deployments.stores import supervisor
                supervisor.ensure("redis", selector={"rma.io/tier": "service"})
                supervisor.endpoint("redis", timeout=120)
            s = ServicesSettings(replica_env=%r, client_rate=%r, ingress_env=%r, **%r)
            serve_admin.start(%r, %d, 60, %r, %r)
            app = serve.deployment(Gateway).options(**_options("gateway", s.gateway, s.service_selector, s,
                                                               s.ingress_env)).bind(
                s.model_dump(mode="json"), None, None, None, None, None, None)
            try:
                serve.run(app, name="services", route_prefix="/api")
            except Exception as exc:  # a proxy slow to get ready on a busy box is restarted by the controller;
                print("serve.run:", type(exc).__name__)  # the HTTP wait below tells when the route answers
        """) % (case in WITH_REDIS, env, RATE, ingress_env, overrides, ip, http_port, proxy, controller_env)
        r = subprocess.run(
            [sys.executable, "-c", script],
            timeout=600,
            capture_output=True,
            text=True,
            env={
                **ray_env(token),
                "RAY_ADDRESS": f"{ip}:{gcs}",
                "HOME": str(root / "home"),
                "PYTHONPATH": str(REPO),
            },
        )
        if r.returncode != 0:
            raise SystemExit(f"deploying the gateway failed:\n{r.stderr[-3000:]}")
        url = f"http://{ip}:{http_port}/api/whoami"
        wait_for(
            lambda: httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200,
            timeout=300,
            interval=1,
            what="the gateway on Serve",
        )
        settings = ServicesSettings(**overrides)
        wait_for(
            lambda: _replicas(root, token, ip, gcs) >= settings.gateway.min_replicas,
            timeout=300,
            interval=2,
            what="every gateway replica",
        )
        return measure(url)
    finally:
        head.stop(timeout=30)
        shutil.rmtree(head.spec.temp_dir, ignore_errors=True)


def _replicas(root: Path, token: Path, ip: str, gcs: int) -> int:
    script = (
        "import ray\nfrom ray import serve\nray.init(logging_level='ERROR')\n"
        "d = serve.status().applications['services'].deployments['gateway']\n"
        "print(d.replica_states.get('RUNNING', 0))"
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ray_env(token), "RAY_ADDRESS": f"{ip}:{gcs}", "HOME": str(root / "home")},
    )
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0


@contextmanager
def uvicorn_server(root: Path, ip: str, env: dict[str, str], key: str, workers: int = 1) -> Iterator[str]:
    """The same FastAPI app on plain uvicorn (uvloop + httptools, like Serve's replica server)."""
    (root / "baseline_app.py").write_text(BASELINE)
    port = free_port(ip)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "baseline_app:app",
            "--host",
            ip,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            str(workers),
        ],
        cwd=root,
        env={**os.environ, **env, "PYTHONPATH": f"{REPO}:{root}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{ip}:{port}/whoami"
    try:
        wait_for(
            lambda: httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200,
            timeout=60,
            what="plain uvicorn",
        )
        wrk(url, key, 16, 3)  # warm up
        yield url
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
    from deployments.stores.kinds import KINDS
    from deployments.stores.kinds import credentials as store_credentials
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
        words = (
            "river mountain engine contract invoice harbour clinic ledger orbit violin pepper granite "
            "lantern meadow copper falcon"
        ).split()
        docs = [
            {
                "text": " ".join(words[(i * 7 + j) % len(words)] for j in range(60)) + f" record {i}.",
                "source": f"doc-{i}",
            }
            for i in range(chunks)
        ]
        t0 = time.perf_counter()
        for i in range(0, len(docs), 500):
            rag.ingest("pub-bench", docs[i : i + 500])
        ingest_s = time.perf_counter() - t0
        lat = []
        for i in range(queries):
            t = time.perf_counter()
            rag.query("pub-bench", f"{words[i % len(words)]} {words[(i * 3) % len(words)]} record {i}", 5)
            lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        print(
            f"rag: {chunks} chunks ingested in {ingest_s:.1f} s ({chunks / ingest_s:.0f} chunks/s); query over "
            f"{queries} queries: p50 {statistics.median(lat):.1f} ms, p99 {lat[int(0.99 * (len(lat) - 1))]:.1f} ms"
        )
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
    ap.add_argument("--cases", default="python,haproxy-1,pool", help=f"some of: {', '.join(CASES)}")
    ap.add_argument(
        "--uvicorn-workers",
        action="store_true",
        help="also measure plain uvicorn with 2 worker processes (for reference)",
    )
    ap.add_argument(
        "--quota-rpm",
        type=int,
        default=10**9,
        help="the bench key's per-minute quota (never reached; 0: none, so no limiter round trip to Redis)",
    )
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # stopped early: the finally blocks stop the nodes
    if args.part in ("models", "all"):
        models(args.chunks, args.queries)
    if args.part == "models":
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk; `make test` installs it)")
    ip = local_ip_towards("192.0.2.1")
    root = Path(tempfile.mkdtemp(prefix="rma-bench-svc-"))
    coord, url, key, cred = coordinator(root, ip)
    admin = cred.read_text().strip()
    # a quota that never refuses: the limiter and the day's counters run on every request
    httpx.put(
        f"{url}/api/admin/clients/{key.split('_')[2]}/quota",
        json={
            "tokens_per_day": 10**12,
            **({"requests_per_minute": args.quota_rpm} if args.quota_rpm else {}),
        },
        headers={"Authorization": f"Bearer {admin}"},
    ).raise_for_status()
    env = {
        "RMA_COORDINATOR_URL": url,
        "RMA_KEYRING_CREDENTIAL_FILE": str(cred),
        "RMA_KEYRING_REFRESH_S": "10",
        "RMA_STORES_DIR": str(root / "stores"),  # the Redis store of `pool-redis`
    }
    # plain uvicorn stays up and is measured right before each Serve case at each connection count, so that
    # every ratio compares two runs seconds apart on this shared box
    results: dict[str, Any] = {}
    loads: list[float] = []
    try:
        with uvicorn_server(root, ip, env, key) as base_url:

            def measure(serve_url: str) -> dict[str, Any]:
                wrk(serve_url, key, 16, 3)  # warm up
                out: dict[str, Any] = {}
                for c in (16, 64):
                    loads.append(os.getloadavg()[0])
                    out[f"uvicorn-{c}"] = wrk(base_url, key, c, args.seconds)
                    out[f"serve-{c}"] = wrk(serve_url, key, c, args.seconds)
                return out

            for case in args.cases.split(","):
                try:
                    results[case] = serve_case(root, ip, env, case, key, measure)
                except (TimeoutError, SystemExit) as exc:
                    print(f"serve-{case}: did not come up: {str(exc)[:300]}")
        if args.uvicorn_workers:
            with uvicorn_server(root, ip, env, key, workers=2) as two:
                results["uvicorn-2-workers"] = {
                    f"serve-{c}": wrk(two, key, c, args.seconds) for c in (16, 64)
                }
    finally:
        coord.terminate()
        coord.wait(10)
        for pidfile in (root / "stores").glob("*/.rma-pid.json"):  # pool-redis: the supervisor's redis-server
            try:
                os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{'case':<22}{'conns':>6}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'uvicorn rps':>12}"
        f"{'rps ratio':>10}{'p50 ratio':>10}{'p99 ratio':>10}"
    )
    for name, by in results.items():
        for c in (16, 64):
            r, b = by[f"serve-{c}"], by.get(f"uvicorn-{c}")
            ratio = (
                (
                    f"{b['rps']:>12.0f}{r['rps'] / b['rps']:>10.3f}{r['p50_ms'] / b['p50_ms']:>10.2f}"
                    f"{r['p99_ms'] / b['p99_ms']:>10.2f}"
                )
                if b
                else ""
            )
            print(
                f"{name:<22}{c:>6}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>9}{ratio}"
            )
    off = results.get("pool-meter-off")
    for case in ("pool", "pool-redis"):
        if off and case in results:
            for c in (16, 64):
                r, b = results[case][f"serve-{c}"], off[f"serve-{c}"]
                print(
                    f"metering ({case} / pool-meter-off), {c} connections: rps {r['rps'] / b['rps']:.3f}, "
                    f"p50 {r['p50_ms'] / b['p50_ms']:.2f}, p99 {r['p99_ms'] / b['p99_ms']:.2f}"
                )
    if loads:
        print(
            f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
