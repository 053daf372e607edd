"""Drift guards for the docker runtime of the store supervisors: every store kind has a container spec and an image
under images/stores/, every image is built FROM the local base, runs as the uid the runtime chowns the volume to,
has a health check and bakes in no secret; and the runtime module stays cheap to import (no docker SDK)."""

from __future__ import annotations

import re
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
