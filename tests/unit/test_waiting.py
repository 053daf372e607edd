"""rma_ray.waiting: the one deadline loop (a fake clock: no real sleeping)."""

from __future__ import annotations

import pytest

from rma_ray.waiting import GiveUp, WaitTimeout, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_returns_the_first_truthy_answer_and_keeps_errors_as_not_yet() -> None:
    clock, answers = FakeClock(), iter([None, OSError("refused"), 0, "ready"])

    def probe() -> object:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    assert wait_until(probe, timeout=10, interval=1, sleep=clock.sleep, clock=clock) == "ready"
    assert clock.now == 3


def test_times_out_naming_what_and_the_last_error() -> None:
    clock = FakeClock()

    def probe() -> None:
        raise ConnectionError("port 8470 refused")

    with pytest.raises(WaitTimeout, match=r"after 5 s waiting for the coordinator .*port 8470 refused") as e:
        wait_until(probe, timeout=5, interval=2, what="the coordinator", sleep=clock.sleep, clock=clock)
    assert isinstance(e.value, TimeoutError)
    assert clock.now == 5  # the last sleep is cut to the deadline


def test_give_up_ends_the_wait_at_once() -> None:
    clock = FakeClock()

    def probe() -> None:
        raise GiveUp("the process exited")

    with pytest.raises(GiveUp):
        wait_until(probe, timeout=100, sleep=clock.sleep, clock=clock)
    assert clock.now == 0
