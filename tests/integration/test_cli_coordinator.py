"""The `rma` CLI against `rma admission serve` run as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, wait_for

RMA = [sys.executable, "-m", "rma_ray.cli"]
KEY_RE = re.compile(r"rma_admin_[0-9a-f]{12}_[0-9a-f]{64}")


def rma(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RMA, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str], str]]:
    """`rma admission serve` on a free port with its own data dir (~2 s to start)."""
    port = free_port()
    data = tmp_path / "coord"
    proc = subprocess.Popen(
        [*RMA, "admission", "serve", "--port", str(port), "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # no Ray head here: admit anyway, registrations are what these tests drive
        env={**os.environ, "COLUMNS": "200", "RMA_ADMIT_WITHOUT_RAY": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []

    def key_printed() -> str | None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        lines.append(line)
        m = KEY_RE.search(line)
        return m.group(0) if m else None

    try:
        key = wait_for(key_printed, timeout=60, what="the first admin key to be printed")
        wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=30, what="the coordinator")
        yield url, data, proc, key
    finally:
        proc.terminate()
        proc.wait(15)


def test_serve_prints_admin_key_once_and_keeps_only_its_hash(served: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    url, data, proc, key = served
    secret = key.split("_")[3]
    for f in data.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"the admin key is stored in clear in {f}"
    proc.terminate()
    proc.wait(15)
    port = free_port()
    again = subprocess.Popen(
        [*RMA, "admission", "serve", "--port", str(port), "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
            timeout=30,
            what="the restarted coordinator",
        )
        r = httpx.get(
            f"http://127.0.0.1:{port}/api/admin/workers", headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200  # the key from the first start still works
    finally:
        again.terminate()
        out, _ = again.communicate(timeout=15)
    assert not KEY_RE.search(out), "a second start must not print (or mint) another admin key"


def test_invite_join_list_revoke_through_the_cli(served: tuple) -> None:  # type: ignore[type-arg]
    url, _, _, key = served
    env = {"RMA_COORDINATOR_URL": url, "RMA_ADMIN_KEY": key}
    r = rma("invite", "create", "--ttl", "10m", "--trusted", "--tier", "data", env=env)
    assert r.returncode == 0, r.stderr
    token = re.search(r"rma_join_[0-9a-f]{12}_[0-9a-f]{64}", r.stdout).group(0)  # type: ignore[union-attr]
    assert key not in r.stdout + r.stderr
    caps = {"cpu_cores": 2, "ram_mb": 4096, "disk_free_gb": 50}
    reg = httpx.post(
        url + "/api/worker/register",
        json={"name": "laptop", "capabilities": caps},
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert reg["tier"] == "data"
    r = rma("donors", "list", "--json", env=env)
    assert r.returncode == 0 and reg["worker_id"] in r.stdout
    r = rma("donors", "revoke", reg["worker_id"], env=env)
    assert r.returncode == 0 and "revoked" in r.stdout
    r = rma("clients", "create", "frontend", env=env)
    assert r.returncode == 0 and re.search(r"rma_client_[0-9a-f]{12}_[0-9a-f]{64}", r.stdout)
    assert "frontend" in rma("clients", "list", env=env).stdout


def test_edge_and_sensitive_options_through_the_cli(served: tuple) -> None:  # type: ignore[type-arg]
    """Issue 17's admin options: --edge on a pool without edges is refused with what to do, --edge with
    --trusted before any request; a --sensitive client key says so in the list."""
    url, _, _, key = served
    env = {"RMA_COORDINATOR_URL": url, "RMA_ADMIN_KEY": key}
    r = rma("invite", "create", "--edge", "edge", env=env)
    assert r.returncode != 0 and "this pool runs without edges" in r.stdout + r.stderr
    r = rma("invite", "create", "--edge", "edge", "--trusted", env=env)
    assert r.returncode != 0 and "a trusted donor joins the core cluster" in r.stdout + r.stderr
    r = rma("clients", "create", "clinic", "--sensitive", env=env)
    assert r.returncode == 0 and "sensitive" in r.stdout
    listed = rma("clients", "list", "--json", env=env)
    assert [(c["name"], c["sensitive"]) for c in json.loads(listed.stdout)] == [("clinic", True)]
    r = rma("donors", "list", "--cluster", "core", env=env)
    assert r.returncode == 0 and "cluster" in r.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["donors", "list"], {"RMA_COORDINATOR_URL": "http://127.0.0.1:1"}, "cannot reach the coordinator"),
        (["donors", "list"], {}, "unknown or revoked admin key"),
        (["donors", "revoke", "nosuchworker"], None, "no worker nosuchworker"),
        (["invite", "create", "--ttl", "soon"], None, "cannot read the duration"),
        (["invite", "create", "--tier", "quantum"], None, "unknown tier"),
    ],
)
def test_user_mistakes_are_one_line_and_nonzero(
    served: tuple,
    args: list[str],
    env: dict | None,  # type: ignore[type-arg]
    message: str,
) -> None:
    url, _, _, key = served
    base = {"RMA_COORDINATOR_URL": url, "RMA_ADMIN_KEY": key}
    if env == {}:
        base["RMA_ADMIN_KEY"] = "rma_admin_000000000000_" + "0" * 64
    r = rma(*args, env={**base, **(env or {})})
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_admin_key_without_a_terminal(served: tuple) -> None:  # type: ignore[type-arg]
    url, _, _, _ = served
    r = subprocess.run(
        [*RMA, "donors", "list"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "RMA_COORDINATOR_URL": url},
    )
    assert r.returncode == 1 and "no admin key" in r.stderr


def test_insecure_secret_refused_at_start(tmp_path: Path) -> None:
    r = rma("admission", "serve", "--data-dir", str(tmp_path), env={"RMA_SECRET_KEY": "changeme"})
    assert r.returncode == 1 and "well-known default" in r.stderr and "Traceback" not in r.stderr


def _join(url: str, token: str, *extra: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return rma("join", url, *extra, env={"RMA_JOIN_TOKEN": token, "RMA_DATA_DIR": str(data_dir)})


def test_join_failures_are_one_line(served: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    url, _, _, key = served
    invite = httpx.post(
        url + "/api/invites", json={"uses": 5}, headers={"Authorization": f"Bearer {key}"}
    ).json()
    tiny = tmp_path / "tiny.json"
    tiny.write_text('{"cpu_cores": 1, "ram_mb": 1024, "disk_free_gb": 5}')
    cases = [
        (("http://127.0.0.1:1", invite["token"]), (), "cannot reach the coordinator"),
        (("not-a-url", invite["token"]), (), "must start with http"),
        ((url, invite["token"]), ("--capabilities-file", str(tiny)), "below every tier's minimum"),
        ((url, invite["token"]), ("--memory", "lots"), "cannot read the memory size"),
        # this coordinator runs alone (no Ray head): the donor is told so instead of hanging
        ((url, invite["token"]), (), "runs without a Ray head"),
    ]
    for (u, token), extra, message in cases:
        r = _join(u, token, *extra, data_dir=tmp_path / "d")
        assert r.returncode == 1, r.stdout
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    workers = httpx.get(url + "/api/admin/workers", headers={"Authorization": f"Bearer {key}"}).json()
    assert [w["status"] for w in workers] == ["left"]  # the headless join aborted its registration
    invites = httpx.get(url + "/api/invites", headers={"Authorization": f"Bearer {key}"}).json()
    assert invites[0]["uses_left"] == 5  # and gave its invite use back
    r = rma("status", env={"RMA_DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 1 and "not in a pool" in r.stderr
    r = rma("leave", env={"RMA_DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 1 and "not in a pool" in r.stderr
