"""`rma up`'s supervision loop: how the pool ends decides the exit status a service manager sees.

The Ray head here is a stand-in object (a unit test never starts Ray); it answers the two questions the loop asks.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rma_ray.head import Pool, UpOptions


class StandInHead:
    def __init__(self, alive_checks: int) -> None:
        self.left = alive_checks
        self.log_path = Path("/nonexistent/head.log")

    def track(self) -> None:
        pass

    def running(self) -> bool:
        self.left -= 1
        return self.left >= 0


def make_pool(tmp_path: Path) -> tuple[Pool, list[str]]:
    said: list[str] = []
    pool = Pool(UpOptions(data_dir=tmp_path, node_ip="127.0.0.1", coordinator_host="127.0.0.1"), said.append)
    pool.stop_event.wait = lambda timeout=None: pool.stop_event.is_set()  # type: ignore[method-assign]
    return pool, said


def test_a_dead_head_ends_supervision_as_a_failure(tmp_path: Path) -> None:
    pool, said = make_pool(tmp_path)
    pool.head = StandInHead(alive_checks=3)  # type: ignore[assignment]
    assert pool.supervise() is False
    assert any("the Ray head stopped" in line for line in said)


def test_a_requested_stop_is_clean(tmp_path: Path) -> None:
    pool, said = make_pool(tmp_path)
    pool.head = StandInHead(alive_checks=10**9)  # type: ignore[assignment]
    threading.Timer(0.05, pool.stop_event.set).start()
    assert pool.supervise() is True
    assert not any("stopped" in line for line in said)


def test_a_rotation_stops_serve_and_the_stores_then_starts_everything_again(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The rotation's steps, in order, with the Ray-facing steps stood in (a rotation once called a stop step
    that `rma down`'s rework had removed, and ended the pool)."""
    import subprocess

    pool, said = make_pool(tmp_path)
    steps: list[str] = []
    for name in ("_shutdown_serve", "stop_stores", "start_head", "start_serve", "start_deployments"):
        monkeypatch.setattr(pool, name, lambda *_, name=name: steps.append(name) or {})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: steps.append("serve_admin shutdown"))
    pool.token_file.write_text("old\n")
    pool.rotate()
    assert steps == [
        "_shutdown_serve",
        "stop_stores",
        "serve_admin shutdown",
        "start_head",
        "start_serve",
        "start_deployments",
    ]
    assert pool.token_file.read_text().strip() not in ("", "old")
    assert any("cluster token rotated" in line for line in said)
