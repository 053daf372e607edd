"""Drift guards for the docker runtime of the store supervisors: every store kind has a container spec and an image
under images/stores/, every image is built FROM the local base, runs as the uid the runtime chowns the volume to,
has a health check and bakes in no secret; and the runtime module stays cheap to import (no docker SDK)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.stores.docker_runtime import SPECS
from deployments.stores.kinds import KINDS

IMAGES = Path(__file__).resolve().parents[2] / "images" / "stores"


def test_every_store_kind_has_a_container_spec_and_an_image() -> None:
    assert sorted(SPECS) == sorted(KINDS)
    assert sorted(p.name for p in IMAGES.iterdir() if (p / "Dockerfile").exists()) == sorted(KINDS)
    for name, spec in SPECS.items():
        assert spec.image == f"rma-store-{name}:latest"


@pytest.mark.parametrize("store", sorted(KINDS))
def test_image_is_local_non_root_health_checked_and_secret_free(store: str) -> None:
    text = (IMAGES / store / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "rma-base:bookworm" for f in froms)  # never a registry pull
    final = text[text.rindex("\nFROM ") :]
    assert re.search(rf"^USER {SPECS[store].uid}:{SPECS[store].uid}$", final, re.M)
    assert re.search(r"^HEALTHCHECK ", final, re.M)
    assert not re.search(r"(?i)(password|secret|token)\s*=", text)
    assert not re.search(r"(?im)^ENV .*(pass|secret|token)", text)


def test_importing_the_runtime_does_not_import_the_docker_sdk() -> None:
    code = (
        "import sys, deployments.stores.runtime as r, deployments.stores.docker_runtime as d; "
        "assert 'docker' not in sys.modules, 'docker imported eagerly'"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns to the store's uid: root only")
def test_a_secret_file_is_written_new_and_no_link_left_there_is_followed(tmp_path: Path) -> None:
    """The runtime writes a store's config and password files as root into the store user's volume: a link that
    user left at the file's name (its process may be compromised) must neither be written through nor have its
    target chowned to that user; a file already there gets the new content at 0600, the store's."""
    from deployments.stores.docker_runtime import _write_private

    uid = SPECS["redis"].uid
    target = tmp_path / "root-only"
    target.write_text("root's\n")
    target.chmod(0o644)
    (tmp_path / "redis.conf").symlink_to(target)
    _write_private(tmp_path / "redis.conf", "requirepass s3cret\n", uid)
    conf = tmp_path / "redis.conf"
    assert not conf.is_symlink() and conf.read_text() == "requirepass s3cret\n"
    st = conf.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, uid, uid)
    assert target.read_text() == "root's\n" and target.stat().st_uid == 0
    old = tmp_path / ".pwfile"
    old.write_text("old")
    old.chmod(0o666)  # a stale file keeps its mode when opened by name: this one must not
    _write_private(old, "new\n", uid)
    assert old.read_text() == "new\n" and stat.S_IMODE(old.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".pwfile",
        "redis.conf",
        "root-only",
    ]  # no temp left
