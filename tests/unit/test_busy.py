"""--yield-when-busy: the hysteresis over the owner's use, fed fake samples on an injected clock."""

from __future__ import annotations

import psutil

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
