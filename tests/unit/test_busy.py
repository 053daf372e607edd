"""--yield-when-busy: the hysteresis over the owner's use, fed fake samples on an injected clock."""

from __future__ import annotations

from typing import NamedTuple

import psutil
import pytest

from rma_ray.busy import BusyPolicy, BusyWatch, OwnerLoad


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def feed(watch: BusyWatch, clock: Clock, samples: list[float], step: float = 10.0) -> list[bool]:
    out = []
    for s in samples:
        out.append(watch.update(s))
        clock.t += step
    return out


def test_yields_after_busy_for_and_returns_after_idle_for() -> None:
    clock = Clock()
    watch = BusyWatch(BusyPolicy(busy_percent=50, busy_for_s=30, idle_percent=20, idle_for_s=60), clock)
    # a game starts: busy at t=0..30 -> yield at the sample 30 s after the first busy one
    assert feed(watch, clock, [10, 80, 90, 85, 95]) == [False, False, False, False, True]
    # in between (35%) neither busy nor idle: stays aside
    assert feed(watch, clock, [35, 35, 10, 10, 10, 10, 10, 10, 10]) == [True] * 8 + [False]


def test_a_short_spike_or_dip_resets_the_count() -> None:
    clock = Clock()
    watch = BusyWatch(BusyPolicy(busy_percent=50, busy_for_s=30, idle_percent=20, idle_for_s=30), clock)
    assert not any(feed(watch, clock, [90, 90, 40, 90, 90, 40]))  # never 30 s in a row
    assert feed(watch, clock, [90, 90, 90, 90]) == [False, False, False, True]
    assert all(feed(watch, clock, [5, 5, 30, 5, 5]))  # a dip of busy-ness breaks the idle count


def test_policy_problems() -> None:
    assert BusyPolicy().problem() is None
    assert "must not be above" in (BusyPolicy(busy_percent=30, idle_percent=40).problem() or "")
    assert "between 0 and 100" in (BusyPolicy(busy_percent=130).problem() or "")


def test_owner_load_leaves_out_the_pool() -> None:
    # this test process stands in for the pool's `ray start`: its own use is never the owner's
    load = OwnerLoad(lambda: psutil.Process().pid)
    sum(i * i for i in range(300_000))
    value = load.sample()
    assert 0.0 <= value <= 100.0
    assert load._procs and psutil.Process().pid in load._procs


class Times(NamedTuple):
    user: float
    system: float
    idle: float


class PTimes(NamedTuple):
    user: float
    system: float
    children_user: float
    children_system: float


class FakePsutil:
    """psutil's cumulative readings, set by the test: system-wide CPU seconds and a process tree."""

    Error = psutil.Error

    def __init__(self) -> None:
        self.busy, self.idle = 100.0, 900.0
        self.procs: dict[int, dict[str, float]] = {}  # pid -> created, own, reaped

    def cpu_times(self) -> tuple[float, ...]:
        return Times(self.busy, 0.0, self.idle)

    def tick(self, pool: float, owner: float, total: float = 40.0) -> None:
        """`total` CPU seconds pass (4 cores, 10 s): `pool` + `owner` of them busy."""
        self.busy += pool + owner
        self.idle += total - pool - owner

    def Process(self, pid: int) -> object:  # noqa: N802 (psutil's name)
        fake = self
        if pid not in self.procs:
            raise psutil.NoSuchProcess(pid)

        class P:
            def __init__(self) -> None:
                self.pid = pid

            def create_time(self) -> float:
                return fake.procs[pid]["created"]

            def cpu_times(self) -> tuple[float, ...]:
                p = fake.procs[pid]
                return PTimes(p["own"], 0.0, p["reaped"], 0.0)

            def children(self, recursive: bool = False) -> list[object]:
                return [fake.Process(c) for c in fake.procs if c != pid]

        return P()


def test_owner_load_counts_workers_that_come_and_go_as_the_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    from rma_ray import busy

    ps = FakePsutil()
    monkeypatch.setattr(busy, "psutil", ps)
    monkeypatch.setattr(busy, "_nvml_handles", lambda: [])
    wall = [1000.0]
    ps.procs[100] = {"created": 10.0, "own": 5.0, "reaped": 0.0}  # the `ray start` tree (raylet and all)
    load = OwnerLoad(lambda: 100, wall=lambda: wall[0])
    # a worker starts, burns 20 s of CPU and exits between two samples: the raylet reaps it
    wall[0] += 10
    ps.procs[100]["own"] += 2
    ps.procs[100]["reaped"] += 20
    ps.tick(pool=22, owner=0)
    assert load.sample() == pytest.approx(0.0)  # all of the machine's use was the pool's
    # a worker that is new at this sample (8 s used so far) while the owner uses 10 of the 40 CPU seconds
    wall[0] += 10
    ps.procs[300] = {"created": 1005.0, "own": 8.0, "reaped": 0.0}
    ps.tick(pool=8, owner=10)
    assert load.sample() == pytest.approx(25.0)
    # it uses 4 s more and exits: the raylet's reaped time takes over its whole 12 s
    wall[0] += 10
    del ps.procs[300]
    ps.procs[100]["reaped"] += 12
    ps.tick(pool=4, owner=0)
    assert load.sample() == pytest.approx(0.0)
    # the node stops (paused): everything busy is the owner's
    wall[0] += 10
    ps.procs.clear()
    ps.tick(pool=0, owner=30)
    assert load.sample() == pytest.approx(75.0)
    # it starts again within the interval: its time since it started is the pool's, not the owner's
    wall[0] += 10
    ps.procs[400] = {"created": wall[0] - 5, "own": 6.0, "reaped": 0.0}
    ps.tick(pool=6, owner=0)
    load.pool_root = lambda: 400
    assert load.sample() == pytest.approx(0.0)
