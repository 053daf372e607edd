"""Test helpers shared by integration and e2e tests: a private PostgreSQL, a coordinator on a real port,
and waiting on conditions (never sleeping and hoping)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

T = TypeVar("T")


class GiveUp(Exception):
    """Raised by a wait_for predicate when waiting longer cannot help (the process it waits on has exited)."""


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except GiveUp:
            raise
        except Exception as exc:  # the thing may not be up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port(host: str = "127.0.0.1", span: int = 1) -> int:
    """A port free on every address here (`host` too); with span > 1, the first of `span` consecutive free ports
    (the graph store takes its Bolt port and the next one for HTTP: a busy next port leaves ArcadeDB up but not
    answering). Above the kernel's ephemeral range (`rma_ray.net.free_port`): a server that binds the port
    later, on all addresses as HAProxy does, does not find it taken by one of Ray's connections meanwhile."""
    from rma_ray.net import free_port as pick

    return pick(host, span)


def pool_ports(ip: str) -> list[str]:
    """`rma up`'s port options (GCS, dashboard, coordinator, Serve), each a free port of `ip`: a test's own
    pool beside anything else on the box."""
    return [
        a
        for opt in ("--gcs-port", "--dashboard-port", "--coordinator-port", "--serve-port")
        for a in (opt, str(free_port(ip)))
    ]


def kill_left_stores(stores: Path) -> None:
    """Kill any store process under `stores` that `rma down` failed to stop (by the PID file each store keeps),
    so one failed test leaves nothing running."""
    import json

    import psutil

    for pidfile in stores.glob("*/.rma-pid.json"):
        try:
            psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
        except (psutil.Error, OSError, ValueError):
            pass


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    root: Path

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://rma@{self.host}:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host={self.host} port={self.port} user=rma dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def run_postgres() -> Iterator[Postgres]:
    """A throw-away PostgreSQL server: initdb + postgres as user `postgres` (initdb refuses root)."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql); `make test` installs it")
    root = Path(tempfile.mkdtemp(prefix="rma-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = {"user": "postgres", "group": "postgres"}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "rma", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        **as_user,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **as_user,
    )
    pg = Postgres("127.0.0.1", port, proc, root)
    try:
        import psycopg

        wait_for(
            lambda: psycopg.connect(f"host=127.0.0.1 port={port} user=rma dbname=postgres").close() or True,
            timeout=30,
            what="postgres to accept connections",
        )
        yield pg
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


class ServerThread:
    """An ASGI app served by uvicorn on a real port, in a thread of the test process."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=self.host, port=self.port, log_level="warning", access_log=False, lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_for(
            lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200,
            timeout=30,
            what="the coordinator to serve /healthz",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def parse_python(source: str) -> Any:
    """`ast.parse`, tried again when CPython 3.11 raises "SystemError: AST constructor recursion depth mismatch":
    its AST constructor compares the recursion depth (limit minus what is left) before and after, and a thread
    left running by an earlier test that changes the recursion limit meanwhile makes them differ (seen in the
    unit suite in some random orders; fixed in later CPython versions). The parse itself is deterministic."""
    import ast

    for _ in range(20):
        try:
            return ast.parse(source)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            time.sleep(0.05)
    return ast.parse(source)


def batch_jsonl(endpoint: str, n: int, body: Callable[[int], Any], prefix: str) -> bytes:
    """A Batch API input file: `n` lines to `endpoint`, custom ids `{prefix}-{i}`, bodies `body(i)`."""
    return b"".join(
        json.dumps(
            {"custom_id": f"{prefix}-{i}", "method": "POST", "url": endpoint, "body": body(i)}
        ).encode()
        + b"\n"
        for i in range(n)
    )
