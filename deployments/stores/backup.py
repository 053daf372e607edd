"""Backups of a store with the store's own tools, run by its supervisor on the store's node (`rma stores backup`
and `restore` move the bytes between here and the operator's machine in chunks, through Ray).

One backup is one file plus a manifest (kind, format, the store's version, time, size, sha256):
- postgres: `pg_dump -Fc` of the pool's database (a consistent snapshot by itself, the store stays up);
  restore: `pg_restore --clean --if-exists` into the running store (objects the dump holds are dropped and made
  again; a table created after the backup stays).
- redis: a `BGSAVE` of its own (after a running save or AOF rewrite), wait for it to finish, copy `dump.rdb`
  (the store stays up). Restore, with the store stopped: the RDB becomes the base file of a fresh AOF (the
  store runs with `appendonly yes`, and Redis 7 reads the AOF, not `dump.rdb`, when AOF is on), so it
  starts with exactly the backed-up keys.
- chroma, graph: neither has an online snapshot of its directory that this runtime can drive (Chroma has none;
  ArcadeDB's BACKUP DATABASE covers one database and not the server's users), so the supervisor STOPS the store
  (a clean shutdown flushes its files), tars the directory, and starts it again: consistent at the cost of a
  few seconds of unavailability (a SIGSTOP pause would only give a crash-consistent copy of HNSW files and the
  JVM's pages). Restore: stop, replace the directory, start. The graph store's snapshot is its `databases/`
  directory: its users (the root password's hash) stay those of the volume it is restored into.
Secrets never reach a command line: pg_dump/pg_restore get the password in PGPASSWORD."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.stores.kinds import Endpoint, _pg_bin
from deployments.stores.runtime import StoreError

FORMAT_VERSION = 1
FORMATS = {"postgres": "pg_dump-custom", "redis": "rdb", "chroma": "tar", "graph": "tar"}
# the directory each stopped-snapshot kind keeps its data in: ArcadeDB's databases only, not its config/, whose
# server-users file holds the root password's hash (the node's own credential, which a move does not carry)
DIRS = {"chroma": "chroma", "graph": "arcadedb/databases"}
STOP_TO_BACKUP = frozenset(DIRS)
STOP_TO_RESTORE = frozenset({"redis", *DIRS})
CHUNK = 8 * 1024 * 1024


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _pg_env(ep: Endpoint) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": ep.password, "PGCONNECT_TIMEOUT": "10"}


def _pg_args(ep: Endpoint) -> list[str]:
    return ["-h", ep.host, "-p", str(ep.port), "-U", ep.user]


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise StoreError(f"{Path(argv[0]).name} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return r.stdout


def store_version(kind: str, ep: Endpoint, volume: Path) -> str:
    """The store's version, for the manifest (best effort: the backup does not depend on it)."""
    try:
        if kind == "postgres":
            import psycopg

            with psycopg.connect(ep.url(), connect_timeout=5) as c:
                return str(c.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        if kind == "redis":
            import redis

            with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=5) as r:
                return str(r.info("server")["redis_version"])
        if kind == "chroma":
            from importlib.metadata import version

            return version("chromadb")
        if kind == "graph":
            from importlib.metadata import version

            return version("arcadedb-jvm")
    except Exception as exc:  # the version is informative only
        return f"unknown ({type(exc).__name__})"
    return "unknown"


REDIS_BUSY = ("in progress", "another child process is active")  # a save or an AOF rewrite is running


def redis_bgsave(r: Any, wait_s: float, volume: Path, sleep: Callable[[float], None] = time.sleep) -> None:
    """Have redis write `dump.rdb` now, by a BGSAVE of our own (one started earlier would miss the latest
    writes): while another save or an AOF rewrite runs, BGSAVE is refused, so wait and ask again; then wait
    until the save is done (`rdb_bgsave_in_progress`, set when BGSAVE returns) and check
    `rdb_last_bgsave_status`. Not by LASTSAVE: it has 1 s resolution, two backups in one second look alike."""
    import redis

    from rma_ray.waiting import GiveUp, WaitTimeout, wait_until

    def started() -> bool:
        try:
            r.bgsave()
            return True
        except redis.ResponseError as exc:
            if any(b in str(exc).lower() for b in REDIS_BUSY):
                return False
            raise GiveUp(f"redis BGSAVE failed: {exc}") from None

    def saved() -> bool:
        return not r.info("persistence")["rdb_bgsave_in_progress"]

    try:
        wait_until(started, timeout=wait_s, interval=0.2, sleep=sleep, what="redis to take a BGSAVE")
        wait_until(saved, timeout=wait_s, interval=0.2, sleep=sleep, what="redis's BGSAVE to finish")
    except GiveUp as exc:
        raise StoreError(str(exc)) from None
    except WaitTimeout as exc:
        raise StoreError(f"{exc} (another save or an AOF rewrite running?)") from None
    info = r.info("persistence")
    if info["rdb_last_bgsave_status"] != "ok":
        raise StoreError(f"redis BGSAVE failed; see {volume}/redis.log")


def dump_online(kind: str, ep: Endpoint, volume: Path, out: Path, wait_s: float = 600) -> None:
    """A backup taken while the store serves (postgres, redis)."""
    if kind == "postgres":
        _run(
            [_pg_bin("pg_dump"), "-Fc", "-f", str(out), *_pg_args(ep), "-d", ep.database or "postgres"],
            env=_pg_env(ep),
        )
        return
    if kind == "redis":
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=30) as r:
            redis_bgsave(r, wait_s, volume)
        shutil.copyfile(volume / "dump.rdb", out)
        return
    raise StoreError(f"{kind} is backed up with the store stopped")


def snapshot_stopped(kind: str, volume: Path, out: Path) -> None:
    """A tar of the kind's data directory; the store is stopped (its files are whole and still)."""
    src = volume / DIRS[kind]
    if not src.is_dir():
        raise StoreError(f"{kind} has no data directory at {src} yet: nothing to back up")
    with tarfile.open(out, "w") as tar:
        tar.add(src, arcname=DIRS[kind])


def restore_online(kind: str, ep: Endpoint, src: Path) -> None:
    if kind != "postgres":
        raise StoreError(f"{kind} is restored with the store stopped")
    _run(
        [
            _pg_bin("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            *_pg_args(ep),
            "-d",
            ep.database or "postgres",
            str(src),
        ],
        env=_pg_env(ep),
    )


def restore_stopped(kind: str, volume: Path, src: Path) -> None:
    """Put the backup in place of the store's data (the store is stopped); the old data is removed only once
    the new is whole beside it."""
    stamp = f"{os.getpid()}-{int(time.time())}"
    if kind == "redis":
        aof = volume / "appendonlydir"
        fresh = volume / f".appendonlydir-restore-{stamp}"
        fresh.mkdir()
        shutil.copyfile(src, fresh / "appendonly.aof.1.base.rdb")
        (fresh / "appendonly.aof.manifest").write_text("file appendonly.aof.1.base.rdb seq 1 type b\n")
        _swap(fresh, aof)
        shutil.copyfile(src, volume / "dump.rdb")
        return
    target = volume / DIRS[kind]
    staging = volume / f".restore-{stamp}"
    staging.mkdir()
    try:
        with tarfile.open(src) as tar:
            tar.extractall(staging, filter="data")
        if not (staging / DIRS[kind]).is_dir():
            raise StoreError(f"the backup holds no {DIRS[kind]}/ directory: not a {kind} backup")
        target.parent.mkdir(parents=True, exist_ok=True)
        _swap(staging / DIRS[kind], target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def manifest(kind: str, version: str, path: Path, runtime: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "store": kind,
        "format": FORMATS[kind],
        "store_version": version,
        "runtime": runtime,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_of(path),
    }


def counts(kind: str, ep: Endpoint) -> dict[str, int]:
    """What the store holds, counted with its own queries: rows per table, keys, records per collection, nodes
    and relationships. A move checks them on both sides; a backup's manifest keeps them."""
    if kind == "postgres":
        import psycopg
        from psycopg import sql

        with psycopg.connect(ep.url(), connect_timeout=10) as c:
            tables = c.execute(
                "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
                " AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
            ).fetchall()
            return {
                f"{schema}.{name}": int(
                    c.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
                    ).fetchone()[0]  # type: ignore[index]
                )
                for schema, name in tables
            }
    if kind == "redis":
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=10) as r:
            return {f"{db}.keys": int(v["keys"]) for db, v in r.info("keyspace").items()}
    if kind == "chroma":
        import httpx

        base = (
            f"http://{ep.host}:{ep.port}/api/v2/tenants/default_tenant/databases/default_database/collections"
        )
        with httpx.Client(timeout=30) as c:
            cols = c.get(base).raise_for_status().json()
            return {
                col["name"]: int(c.get(f"{base}/{col['id']}/count").raise_for_status().json()) for col in cols
            }
    if kind == "graph":
        from neo4j import GraphDatabase

        with (
            GraphDatabase.driver(f"bolt://{ep.host}:{ep.port}", auth=(ep.user, ep.password)) as d,
            d.session(database=ep.database) as s,
        ):
            nodes = s.run("MATCH (n) RETURN count(n) AS n").single()["n"]  # type: ignore[index]
            rels = s.run("MATCH ()-[r]->() RETURN count(r) AS n").single()["n"]  # type: ignore[index]
            return {"nodes": int(nodes), "relationships": int(rels)}
    raise StoreError(f"no counts for {kind}")
