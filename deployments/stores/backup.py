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
Secrets never reach a command line: pg_dump/pg_restore get the password in PGPASSWORD.

Both runtimes (`process`, `docker`) take the same backups: the functions below work on the directory that holds
the store's files, the volume itself under `process` and `<volume>/container` (bind-mounted at `/data`) under
`docker`, whose layout inside is the same (`dump.rdb` and `appendonlydir/`, `chroma/`, `arcadedb/databases/`);
postgres is dumped and restored over the network either way. So the file and the manifest (kind, format,
version, counts, sha256; `runtime` says where it was taken) do not depend on the runtime, and a backup taken
under one restores under the other. What is written into a docker store's bind mount (a restore's files) is
made the image's uid's (the container runs as it, not as root), directories 0700 and files 0600; what the
store wrote itself stays as it was, under the 0700 `container/` directory.

A backup restores into the same or a newer version of its store, never an older one, whatever the runtimes:
an older Redis refuses a newer RDB, pg_restore a newer archive, and Chroma's SQLite and ArcadeDB's files are
migrated forward only (`check_restorable` refuses, before any byte is sent, saying which version to run). Under
docker the store's version is the image's (its chromadb, its ArcadeDB jars), not the supervisor's packages."""

from __future__ import annotations

import hashlib
import os
import re
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


def arcadedb_version(jar_names: list[str]) -> str:
    """ArcadeDB's own version, from its engine jar's name (`arcadedb-engine-26.11.1-SNAPSHOT.jar`): the same
    under both runtimes (the docker image has the jars, not the wheel's metadata)."""
    for name in jar_names:
        m = re.fullmatch(r"arcadedb-engine-(\d[^/]*)\.jar", name)
        if m:
            return m.group(1)
    return "unknown (no arcadedb-engine jar)"


def store_version(kind: str, ep: Endpoint, volume: Path, runtime: Any = None) -> str:
    """The store's version, for the manifest and `check_restorable`; never raises ("unknown (...)": nothing
    is refused on it). Postgres and Redis say theirs over the network; for Chroma (whose server says "1.0.0"
    whatever its release) and ArcadeDB, the runtime's `image_version` where it has one (docker), else the
    packages the process runtime runs them from."""
    try:
        if kind in ("chroma", "graph") and hasattr(runtime, "image_version"):
            return str(runtime.image_version())
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
            from deployments.stores.kinds import KINDS

            return arcadedb_version(sorted(os.listdir(KINDS["graph"]._home() / "jars")))
    except Exception as exc:  # the version is informative only
        return f"unknown ({type(exc).__name__})"
    return "unknown"


def release(version: object) -> tuple[int, ...] | None:
    """The numeric release a version string starts with (`7.0.15`, `15.14 (Debian ...)`, `26.11.1-SNAPSHOT`,
    `26.11.1.dev2`), or None where there is none (`unknown (...)`)."""
    m = re.match(r"\d+(?:\.\d+)*", str(version or ""))
    return tuple(int(p) for p in m.group(0).split(".")) if m else None


# the parts of a release that decide whether its files can be read: a pg_dump archive's format follows
# PostgreSQL's major version, an RDB's Redis's major.minor; Chroma's and ArcadeDB's files the whole release
SIGNIFICANT = {"postgres": 1, "redis": 2}


def check_restorable(kind: str, backup_version: object, store_version: str) -> None:
    """Refuse, before anything is sent, a backup of a newer version of the store than the one it would be
    restored into (see the module docstring), compared on the parts that change the file format (a point
    release never refuses: images and donors' packages drift apart by those); a version either side could not
    tell is not refused."""
    theirs, ours = release(backup_version), release(store_version)
    if theirs is None or ours is None:
        return
    n = SIGNIFICANT.get(kind, len(theirs) + len(ours))
    if theirs[:n] <= ours[:n]:
        return
    where = {
        "chroma": "chromadb on the donor, or the version pinned in images/stores/chroma, then rebuild the image",
        "graph": "arcadedb-jvm on the donor, or the version pinned in images/stores/graph, then rebuild the image",
        "redis": "redis-server on the donor, or the version in images/stores/redis, then rebuild the image",
        "postgres": "PostgreSQL on the donor, or the version in images/stores/postgres, then rebuild the image",
    }[kind]
    raise StoreError(
        f"this backup is of {kind} {backup_version}, newer than the {store_version} this store runs, "
        f"which cannot read it: upgrade the store to {backup_version} or later ({where}), then restore again"
    )


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
            # not redis-py's default BGSAVE SCHEDULE: during an AOF rewrite it answers OK and saves later, so
            # "no save in progress" would be read at once and an older dump.rdb (or none) taken for the backup
            r.bgsave(schedule=False)
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
        raise StoreError(
            f"redis BGSAVE failed; see the store's log (redis.log in its volume {volume}, or the container's log)"
        )


def dump_online(kind: str, ep: Endpoint, root: Path, out: Path, wait_s: float = 600) -> None:
    """A backup taken while the store serves (postgres, redis); `root` holds the store's files (redis writes
    `dump.rdb` there: its `dir`, the bind mount's `/data` under docker, where the image's uid owns it)."""
    if kind == "postgres":
        _run(
            [_pg_bin("pg_dump"), "-Fc", "-f", str(out), *_pg_args(ep), "-d", ep.database or "postgres"],
            env=_pg_env(ep),
        )
        return
    if kind == "redis":
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=30) as r:
            redis_bgsave(r, wait_s, root)
        rdb = root / "dump.rdb"
        os.chmod(rdb, 0o600)  # the store's umask made it 0644; the whole dataset is in it
        shutil.copyfile(rdb, out)
        return
    raise StoreError(f"{kind} is backed up with the store stopped")


def freeze_writes(kind: str, ep: Endpoint) -> None:
    """Refuse writes from now on, keep serving reads: what a move does before its backup, so that the backup is
    the store's last state (a write after it would be lost on the new donor). Writers get the store's own
    error (PostgreSQL "cannot execute ... in a read-only transaction", Redis NOREPLICAS) and retry once the
    store runs on its new donor. Only PostgreSQL and Redis back up while serving; the others are snapshotted
    stopped and a move keeps them stopped instead (StoreSupervisor.backup_begin(freeze=True))."""
    if kind == "postgres":
        import psycopg

        with psycopg.connect(ep.url(), autocommit=True, connect_timeout=10) as c:
            c.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            c.execute("SELECT pg_reload_conf()")
            # sessions read the new default at their next command; end them all so that none writes on under
            # the old one (an open transaction is rolled back: it was not acknowledged)
            # and wait until they are gone, so that none commits after the freeze (pg_terminate_backend's
            # timeout argument needs PostgreSQL 14; a donor's may be older: poll instead)
            others = "pid <> pg_backend_pid() AND backend_type = 'client backend' AND backend_start < %s"
            started = c.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            c.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others}", (started,))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                row = c.execute(
                    f"SELECT count(*) FROM pg_stat_activity WHERE {others}", (started,)
                ).fetchone()
                if not row or not row[0]:
                    break
                time.sleep(0.1)
            else:
                raise StoreError(
                    "postgres sessions did not end within 15 s of the freeze: try the move again"
                )
        return
    if kind == "redis":
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=10) as r:
            # a primary with no replica then refuses every write (NOREPLICAS); in memory only: a restart of
            # redis, or thaw_writes, ends it
            r.config_set("min-replicas-max-lag", 10)
            r.config_set("min-replicas-to-write", 1)
        return
    raise StoreError(f"{kind} is frozen by keeping it stopped")


def is_frozen(kind: str, ep: Endpoint) -> bool:
    """Whether freeze_writes is in force on this store (PostgreSQL's default, Redis's replica rule)."""
    if kind == "postgres":
        import psycopg

        with psycopg.connect(ep.url(), connect_timeout=10) as c:
            row = c.execute("SHOW default_transaction_read_only").fetchone()
        return bool(row and row[0] == "on")
    if kind == "redis":
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=10) as r:
            return int(r.config_get("min-replicas-to-write").get("min-replicas-to-write", 0)) > 0
    return False


def thaw_writes(kind: str, ep: Endpoint) -> None:
    """Undo freeze_writes (a move that stopped before the switch; a store started on a frozen volume)."""
    if kind == "postgres":
        import psycopg

        url = ep.url() + "?options=-c%20default_transaction_read_only%3Doff"
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as c:
            c.execute("ALTER SYSTEM RESET default_transaction_read_only")
            c.execute("SELECT pg_reload_conf()")
        return
    if kind == "redis":
        import redis

        with redis.Redis(host=ep.host, port=ep.port, password=ep.password, socket_timeout=10) as r:
            r.config_set("min-replicas-to-write", 0)
        return
    raise StoreError(f"{kind} is thawed by starting it")


def _neutral(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner in the tar: the same snapshot whichever runtime (and uid) wrote the files; a restore gives
    them to whoever runs the store."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def snapshot_stopped(kind: str, root: Path, out: Path) -> None:
    """A tar of the kind's data directory under `root`; the store is stopped (its files are whole and still)."""
    src = root / DIRS[kind]
    if not src.is_dir():
        raise StoreError(f"{kind} has no data directory at {src} yet: nothing to back up")
    with tarfile.open(out, "w") as tar:
        tar.add(src, arcname=DIRS[kind], filter=_neutral)


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


def give_to(path: Path, uid: int) -> None:
    """`path` (a file or a whole tree) to `uid`, private: directories 0700, files 0600 (a container running
    as `uid` reads and writes them; no other user of the node reads them)."""
    paths = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for p in paths:
        if p.is_symlink():
            os.lchown(p, uid, uid)
            continue
        os.chown(p, uid, uid)
        os.chmod(p, 0o700 if p.is_dir() else 0o600)


class Swapped:
    """What a stopped restore put in place, and the data it replaced, kept beside it (`.<name>-old`) until the
    store has started on the new data: `commit()` then removes the old, `rollback()` puts it back (the new
    data did not start: the store's previous data is not lost with it)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path | None]] = []  # (what was replaced, where its old data is kept)

    def swap(self, new: Path, target: Path) -> None:
        old = target.with_name(f".{target.name}-old")
        _remove(old)
        kept: Path | None = None
        if target.exists():
            os.replace(target, old)
            kept = old
        os.replace(new, target)
        self.pairs.append((target, kept))

    def commit(self) -> None:
        for _, old in self.pairs:
            if old is not None:
                _remove(old)
        self.pairs = []

    def rollback(self) -> None:
        for target, old in reversed(self.pairs):
            _remove(target)
            if old is not None:
                os.replace(old, target)
        self.pairs = []


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def restore_stopped(kind: str, root: Path, src: Path, uid: int | None = None) -> Swapped:
    """Put the backup in place of the store's data under `root` (the store is stopped). The new data is made
    whole beside the old first; the old is kept until the caller has started the store on the new
    (`Swapped.commit`, or `rollback` to put it back). `uid`: whose the new files are (docker: the image's uid),
    made private; None keeps them as made (the process runtime)."""
    stamp = f"{os.getpid()}-{int(time.time())}"
    swapped = Swapped()
    if kind == "redis":
        aof = root / "appendonlydir"
        fresh = root / f".appendonlydir-restore-{stamp}"
        fresh.mkdir(mode=0o700)
        rdb = root / f".dump.rdb-restore-{stamp}"
        try:
            shutil.copyfile(src, fresh / "appendonly.aof.1.base.rdb")
            (fresh / "appendonly.aof.manifest").write_text("file appendonly.aof.1.base.rdb seq 1 type b\n")
            shutil.copyfile(src, rdb)
            if uid is not None:
                give_to(fresh, uid)
                give_to(rdb, uid)
            swapped.swap(fresh, aof)
            swapped.swap(rdb, root / "dump.rdb")
        except BaseException:
            swapped.rollback()
            shutil.rmtree(fresh, ignore_errors=True)
            rdb.unlink(missing_ok=True)
            raise
        return swapped
    target = root / DIRS[kind]
    staging = root / f".restore-{stamp}"
    staging.mkdir(mode=0o700)
    try:
        with tarfile.open(src) as tar:
            tar.extractall(staging, filter="data")
        if not (staging / DIRS[kind]).is_dir():
            raise StoreError(f"the backup holds no {DIRS[kind]}/ directory: not a {kind} backup")
        if uid is not None:
            give_to(staging / DIRS[kind], uid)
        if not target.parent.exists():
            target.parent.mkdir(parents=True, mode=0o700)
            if uid is not None:
                os.chown(target.parent, uid, uid)
        swapped.swap(staging / DIRS[kind], target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return swapped


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
