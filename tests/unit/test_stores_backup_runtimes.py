"""A store backup is the same whichever runtime took it, without Ray or Docker: a directory snapshot carries no
owner, a restore into a docker store's bind mount gives the files to the image's uid (0700/0600), and a
backup of a newer store version is refused before anything is sent (deployments/stores/backup.py)."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pytest

from deployments.stores import backup
from deployments.stores.runtime import StoreError

UID = 999  # the store images' fixed uid
OWNER = UID if os.geteuid() == 0 else os.geteuid()  # chown to another uid needs root


def test_a_snapshot_taken_as_one_owner_restores_as_another(tmp_path: Path) -> None:
    process_volume, docker_files = tmp_path / "vol", tmp_path / "vol2" / "container"
    (process_volume / "arcadedb" / "databases" / "graph").mkdir(parents=True)
    (process_volume / "arcadedb" / "databases" / "graph" / "schema.json").write_text("{}")
    snap = tmp_path / "graph.tar"
    backup.snapshot_stopped("graph", process_volume, snap)
    with tarfile.open(snap) as tar:
        assert {(m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, "", "")}

    docker_files.mkdir(parents=True)
    backup.restore_stopped("graph", docker_files, snap, OWNER).commit()
    restored = docker_files / "arcadedb" / "databases"
    assert (restored / "graph" / "schema.json").read_text() == "{}"
    if os.geteuid() == 0:  # chown needs root (as the supervisor has on a donor)
        for p in [docker_files / "arcadedb", restored, *restored.rglob("*")]:
            st = p.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (UID, 0o700 if p.is_dir() else 0o600), p

    rdb = tmp_path / "dump.rdb"
    rdb.write_bytes(b"REDIS0011...")
    backup.restore_stopped("redis", docker_files, rdb, OWNER).commit()
    for p in [docker_files / "dump.rdb", *(docker_files / "appendonlydir").iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o600
        assert os.geteuid() != 0 or p.stat().st_uid == UID
    assert not [p.name for p in docker_files.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("kind", "theirs", "ours", "refused"),
    [
        ("redis", "7.0.15", "7.0.15", False),
        ("redis", "7.0.15", "7.2.4", False),  # into a newer store: it reads older files
        ("redis", "7.2.4", "7.0.15", True),
        ("redis", "7.0.15", "7.0.11", False),  # a point release: the same RDB format
        ("postgres", "16.4 (Debian 16.4-1)", "15.14 (Debian 15.14-0+deb12u1)", True),
        ("postgres", "15.14 (Debian 15.14-0+deb12u1)", "15.13", False),  # the same major: the same archive
        ("chroma", "1.5.9", "1.5.9", False),
        ("chroma", "1.6.0", "1.5.9", True),
        ("graph", "26.11.1.dev2", "26.11.1-SNAPSHOT", False),  # the wheel's and the jar's spelling
        ("graph", "unknown (ConnectionError)", "26.11.1-SNAPSHOT", False),  # cannot tell: not refused
        ("graph", None, "26.11.1-SNAPSHOT", False),
    ],
)
def test_a_backup_restores_into_the_same_or_a_newer_store(
    kind: str, theirs: str | None, ours: str, refused: bool
) -> None:
    if not refused:
        backup.check_restorable(kind, theirs, ours)
        return
    with pytest.raises(
        StoreError, match=re.escape(f"this backup is of {kind} {theirs}, newer than the {ours}")
    ) as exc:
        backup.check_restorable(kind, theirs, ours)
    assert "then restore again" in str(exc.value)


def test_arcadedb_version_from_its_jars() -> None:
    jars = [
        "agrona-1.20.0.jar",
        "arcadedb-bolt-26.11.1-SNAPSHOT-shaded.jar",
        "arcadedb-engine-26.11.1-SNAPSHOT.jar",
    ]
    assert backup.arcadedb_version(jars) == "26.11.1-SNAPSHOT"
    assert backup.arcadedb_version(["agrona-1.20.0.jar"]).startswith("unknown")
