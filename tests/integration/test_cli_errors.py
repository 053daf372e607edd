"""No traceback for any user mistake: `rma` commands with bad inputs (malformed or wrong keys in the
environment and in files, unreachable or wrong URLs, missing or unreadable files, a taken port, bad durations
and sizes) each print one clear line on stderr and exit non-zero. Runs the real CLI as a subprocess against a
real coordinator (SQLite, in-process; ~0.5 s a command, run 4 at a time)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rma_ray import credentials
from rma_ray.credentials import Kind
from tests.integration.conftest import Coordinator

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def cases(c: Coordinator, tmp: Path, port: int) -> list[tuple[str, list[str], dict[str, str], str]]:
    """(what, argv, env, words the one line must hold)"""
    wrong_admin = credentials.mint(Kind.ADMIN).token  # well formed, unknown to the coordinator
    unreadable = tmp / "unreadable"
    unreadable.mkdir()
    (tmp / "bad.json").write_text("{not json")
    (tmp / "caps.json").write_text('{"cpu_cores": "many"}')
    (tmp / "key").write_text(wrong_admin + "\n")
    url = c.url
    return [
        (
            "malformed admin key in env",
            ["invite", "list", "-c", url],
            {"RMA_ADMIN_KEY": "rma_admin_nope"},
            "rma_admin_",
        ),
        (
            "wrong admin key in env",
            ["donors", "list", "-c", url],
            {"RMA_ADMIN_KEY": wrong_admin},
            "admin key",
        ),
        (
            "wrong admin key in a file",
            ["clients", "list", "-c", url, "--admin-key-file", str(tmp / "key")],
            {},
            "admin key",
        ),
        (
            "missing key file",
            ["invite", "list", "-c", url, "--admin-key-file", str(tmp / "nope")],
            {},
            "cannot read",
        ),
        (
            "key file is a directory",
            ["invite", "list", "-c", url, "--admin-key-file", str(unreadable)],
            {},
            "cannot read",
        ),
        (
            "unreachable coordinator",
            ["invite", "list", "-c", "http://127.0.0.1:1"],
            {"RMA_ADMIN_KEY": wrong_admin},
            "cannot reach",
        ),
        (
            "not a coordinator",
            ["invite", "list", "-c", url + "/nothing-here"],
            {"RMA_ADMIN_KEY": wrong_admin},
            "coordinator",
        ),
        ("garbage URL", ["invite", "list", "-c", "http//oops"], {"RMA_ADMIN_KEY": wrong_admin}, "http"),
        (
            "bad duration",
            ["invite", "create", "-c", url, "--ttl", "forever"],
            {"RMA_ADMIN_KEY": wrong_admin},
            "duration",
        ),
        (
            "bad tier",
            ["invite", "create", "-c", url, "--tier", "huge"],
            {"RMA_ADMIN_KEY": wrong_admin},
            "tier",
        ),
        (
            "malformed admin key for serve",
            ["admission", "serve", "--port", "1"],
            {"RMA_ADMIN_KEY": "garbage"},
            "create-admin-key",
        ),
        ("weak secret", ["admission", "serve"], {"RMA_SECRET_KEY": "changeme"}, "RMA_SECRET_KEY"),
        ("bad setting", ["status"], {"RMA_HEARTBEAT_INTERVAL_S": "often"}, "RMA_HEARTBEAT_INTERVAL_S"),
        ("port taken", ["admission", "serve", "--port", str(port)], {}, str(port)),
        ("bad memory size", ["join", url, "--token", "rma_join_a_b", "--memory", "8XB"], {}, "memory size"),
        ("bad URL scheme", ["join", "ftp://pool", "--token", "x"], {}, "http://"),
        ("missing token file", ["join", url, "--token-file", str(tmp / "nope")], {}, "cannot read"),
        (
            "bad capabilities",
            ["join", url, "--token", "hello", "--capabilities-file", str(tmp / "caps.json")],
            {},
            "capabilities",
        ),
        (
            "unparsable capabilities file",
            ["join", url, "--token", "x", "--capabilities-file", str(tmp / "bad.json")],
            {},
            "bad.json",
        ),
        ("wrong join token", ["join", url, "--token", credentials.mint(Kind.JOIN).token], {}, "join token"),
        ("no join token", ["join", url], {"RMA_JOIN_TOKEN": ""}, "join token"),
        ("unreachable join", ["join", "http://127.0.0.1:1", "--token", "rma_join_a_b"], {}, "cannot reach"),
        ("not in a pool", ["leave"], {}, "not in a pool"),
        ("probe a missing disk", ["probe", "--disk", str(tmp / "nope")], {}, "does not exist"),
        ("unknown store", ["up", "--stores", "mongo"], {}, "unknown store"),
        ("version check, bad URL", ["version", "--check", "pool.example.org"], {}, "http://"),
        ("version check, unreachable", ["version", "--check", "http://127.0.0.1:1"], {}, "cannot reach"),
        ("version check, not a coordinator", ["version", "--check", url + "/nope"], {}, "coordinator URL"),
        (
            "trust of an edge the pool does not run",
            ["edges", "trust", "north", "-c", url],
            {"RMA_ADMIN_KEY": c.admin_key},
            "no edge cluster 'north'",
        ),
    ]


def test_user_mistakes_get_one_line_and_a_non_zero_exit(
    coordinator: Coordinator, tmp_path: Path, taken_port: int
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    base.update(
        HOME=str(tmp_path / "home"),
        RMA_DATA_DIR=str(tmp_path / "data"),
        COLUMNS="200",
        OLLAMA_HOST="http://127.0.0.1:1",
    )

    def run(case: tuple[str, list[str], dict[str, str], str]) -> str | None:
        what, argv, env, words = case
        r = subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", *argv],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        problems = []
        if r.returncode == 0:
            problems.append("exit 0")
        if "Traceback" in r.stdout + r.stderr:
            problems.append("a traceback")
        if not lines or not lines[-1].startswith("error:"):
            problems.append("no error line last on stderr")
        elif words.lower() not in lines[-1].lower():
            problems.append(f"{words!r} not in the error line")
        if len([ln for ln in lines if ln.startswith("error:")]) != 1:
            problems.append("not exactly one error line")
        return (
            f"{what}: {', '.join(problems)}\n  $ rma {' '.join(argv)}\n  stderr: {r.stderr[-1500:]}"
            if problems
            else None
        )

    with ThreadPoolExecutor(4) as pool:
        bad = [b for b in pool.map(run, cases(coordinator, tmp_path, taken_port)) if b]
    assert not bad, "\n".join(bad)
