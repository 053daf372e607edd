"""Store pinning's decision and a backup's checks, without Ray: where a supervisor may start its store, the
selector that keeps it on its donor, the registry's `waiting for <donor>`, the refusals of a wrong or damaged
backup (before anything is sent), and the file side of a restore."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from admission.services.stores import _waiting_why
from deployments.stores import backup
from deployments.stores.supervisor import TRUSTED_DATA, pin_decision, pinned_selector, volume_has_data
from rma_ray.cli import app
from rma_ray.cli.common import CliError
from rma_ray.cli.stores import read_manifest


@pytest.mark.parametrize(
    ("pin", "here", "has_data", "wait_for"),
    [
        (None, "w-a", False, None),  # never placed: start here, and pin it here
        ({"donor": "w-a"}, "w-a", False, None),  # its own donor (a new Ray node id after a rejoin)
        ({"donor": "w-a"}, "w-b", False, "w-a"),  # elsewhere with an empty volume: never start it empty
        ({"donor": "w-a"}, "w-b", True, None),  # its data is here (a volume moved with it): start
        ({}, "w-b", False, None),
    ],
)
def test_pin_decision(pin: dict[str, str] | None, here: str, has_data: bool, wait_for: str | None) -> None:
    assert pin_decision(pin, here, has_data) == wait_for


def test_pinned_selector_keeps_the_supervisor_on_its_donor() -> None:
    pin = {"donor": "w-a", "labelled": True}
    assert pinned_selector(TRUSTED_DATA, pin) == {**TRUSTED_DATA, "rma.io/node": "w-a"}
    assert pinned_selector(TRUSTED_DATA, None) == TRUSTED_DATA
    assert (
        pinned_selector(TRUSTED_DATA, {"donor": "0a1b", "labelled": False}) == TRUSTED_DATA
    )  # no label to match
    assert pinned_selector({"rma.io/tier": "head"}, pin) == {"rma.io/tier": "head"}


def test_volume_has_data(tmp_path: Path) -> None:
    assert not volume_has_data("postgres", tmp_path)
    (tmp_path / "pgdata").mkdir()
    (tmp_path / "pgdata" / "PG_VERSION").write_text("15\n")
    assert volume_has_data("postgres", tmp_path)


def test_registry_says_waiting_for_the_pinned_donor() -> None:
    why = _waiting_why("postgres", {**TRUSTED_DATA, "rma.io/node": "w-a"}, {"w-a": "attic"})
    assert why.startswith("waiting for w-a (attic): the store's data is on that donor")
    assert "--trusted --tier data" in _waiting_why("postgres", TRUSTED_DATA, {})
    # a donor that will not come back (revoked, left): the store waits on, and the way out is said
    for word in ("revoked", "left"):
        why = _waiting_why(
            "postgres", {**TRUSTED_DATA, "rma.io/node": "w-a"}, {"w-a": "attic"}, {"w-a": word}
        )
        assert why.startswith(f"waiting for w-a (attic), which was {word} and will not come back")
        assert why.endswith("`rma stores move postgres --to DONOR --from-backup DIR`")


def _backup(tmp_path: Path, store: str, content: bytes = b"x" * 1000) -> Path:
    d = tmp_path / f"{store}-backup"
    d.mkdir()
    name = f"{store}.bin"
    (d / name).write_bytes(content)
    manifest = {
        "store": store,
        "format": backup.FORMATS[store],
        "file": name,
        "size_bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_restore_refuses_a_backup_of_another_store_in_one_line(tmp_path: Path) -> None:
    src = _backup(tmp_path, "redis")
    assert read_manifest(src, "redis")[0]["store"] == "redis"
    r = CliRunner().invoke(app, ["stores", "restore", "postgres", str(src)])
    assert r.exit_code == 1 and isinstance(r.exception, CliError)  # refused before Ray is reached
    assert "is a backup of 'redis', not of postgres" in str(r.exception)


def test_restore_refuses_a_damaged_or_unfinished_backup(tmp_path: Path) -> None:
    src = _backup(tmp_path, "postgres")
    (src / "postgres.bin").write_bytes(b"y" * 1000)  # same size, other bytes
    with pytest.raises(CliError, match="does not match manifest.json"):
        read_manifest(src, "postgres")
    (src / "manifest.json").unlink()
    with pytest.raises(CliError, match="holds no manifest.json"):
        read_manifest(src, "postgres")
    with pytest.raises(CliError, match="no store 'mysql'"):
        CliRunner().invoke(app, ["stores", "restore", "mysql", str(src)], catch_exceptions=False)


def test_backup_refuses_a_directory_in_use(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    r = CliRunner().invoke(app, ["stores", "backup", "redis", str(tmp_path)])
    assert isinstance(r.exception, CliError) and "not an empty directory" in str(r.exception)


def test_directory_snapshot_round_trip_and_redis_rdb_becomes_the_aof_base(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    (vol / "chroma").mkdir(parents=True)
    (vol / "chroma" / "chroma.sqlite3").write_text("v1")
    snap = tmp_path / "chroma.tar"
    backup.snapshot_stopped("chroma", vol, snap)
    (vol / "chroma" / "chroma.sqlite3").write_text("v2")
    (vol / "chroma" / "later.bin").write_text("after the backup")
    swapped = backup.restore_stopped("chroma", vol, snap)
    assert (vol / "chroma" / "chroma.sqlite3").read_text() == "v1" and not (
        vol / "chroma" / "later.bin"
    ).exists()
    # the old data is kept beside the new until the store has started on it
    assert (vol / ".chroma-old" / "later.bin").read_text() == "after the backup"
    swapped.rollback()  # it did not start: the previous data is back, whole
    assert (vol / "chroma" / "chroma.sqlite3").read_text() == "v2"
    assert (vol / "chroma" / "later.bin").exists() and not (vol / ".chroma-old").exists()
    backup.restore_stopped("chroma", vol, snap).commit()  # it started: the old data goes
    assert (vol / "chroma" / "chroma.sqlite3").read_text() == "v1" and not (vol / ".chroma-old").exists()
    with tarfile.open(snap, "w") as tar:  # a tar without the kind's directory is not its backup
        tar.add(vol / "chroma" / "chroma.sqlite3", arcname="other/x")
    with pytest.raises(backup.StoreError, match="holds no arcadedb/databases/"):
        backup.restore_stopped("graph", vol, snap)

    rdb = tmp_path / "dump.rdb"
    rdb.write_bytes(b"REDIS0010...")
    (vol / "appendonlydir").mkdir()
    (vol / "appendonlydir" / "appendonly.aof.3.incr.aof").write_text("later writes")
    (vol / "dump.rdb").write_bytes(b"REDIS0010 older")
    swapped = backup.restore_stopped("redis", vol, rdb)
    aof = vol / "appendonlydir"
    assert sorted(p.name for p in aof.iterdir()) == ["appendonly.aof.1.base.rdb", "appendonly.aof.manifest"]
    assert (aof / "appendonly.aof.1.base.rdb").read_bytes() == rdb.read_bytes()
    assert (vol / "dump.rdb").read_bytes() == rdb.read_bytes()
    swapped.rollback()
    assert [p.name for p in aof.iterdir()] == ["appendonly.aof.3.incr.aof"]
    assert (vol / "dump.rdb").read_bytes() == b"REDIS0010 older"
    backup.restore_stopped("redis", vol, rdb).commit()
    assert sorted(p.name for p in aof.iterdir()) == ["appendonly.aof.1.base.rdb", "appendonly.aof.manifest"]
    assert not [p.name for p in vol.iterdir() if p.name.endswith("-old")]


@pytest.mark.postgres
def test_a_frozen_postgres_refuses_writes_serves_reads_and_ended_its_sessions() -> None:
    """A move's freeze: every session open before it is ended (none commits after), new ones are read-only,
    reads are served; thawed, writes are taken again. On a server of its own (ALTER SYSTEM is server-wide)."""
    import psycopg

    from deployments.stores.kinds import Endpoint
    from tests.support import run_postgres

    with run_postgres() as pg:
        ep = Endpoint("postgres", pg.host, pg.port, "rma", "", "postgres")
        with psycopg.connect(ep.url(), autocommit=True) as held:
            held.execute("CREATE TABLE t (id int)")
            backup.freeze_writes("postgres", ep)
            assert backup.is_frozen("postgres", ep)
            with pytest.raises(psycopg.OperationalError):
                held.execute("INSERT INTO t VALUES (0)")  # its session was ended before the freeze returned
        with psycopg.connect(ep.url(), autocommit=True) as c:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                c.execute("INSERT INTO t VALUES (1)")
            assert c.execute("SELECT count(*) FROM t").fetchone() == (0,)
        backup.thaw_writes("postgres", ep)
        assert not backup.is_frozen("postgres", ep)
        with psycopg.connect(ep.url(), autocommit=True) as c:
            c.execute("INSERT INTO t VALUES (2)")
            assert c.execute("SELECT count(*) FROM t").fetchone() == (1,)
