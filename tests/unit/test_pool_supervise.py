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
