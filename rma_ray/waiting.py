"""One way to wait for a condition with a deadline (instead of a hand-written `while time.monotonic() < deadline`
loop in each module). The predicate returns something truthy when the wait is over; `GiveUp` from it ends the wait
at once (the process waited on has exited); any other exception counts as "not yet" and is kept for the message.

    from rma_ray.waiting import wait_until, GiveUp
    info = wait_until(lambda: read_if_ready(path), timeout=60, interval=0.5, what="pool.json")

The timeout raises `WaitTimeout` (a `TimeoutError`) naming what was awaited and the last answer or error."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class GiveUp(Exception):
    """Raised by a predicate when waiting longer cannot help."""


class WaitTimeout(TimeoutError):
    def __init__(self, what: str, timeout: float, last: object) -> None:
        super().__init__(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        self.what, self.timeout, self.last = what, timeout, last


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str = "a condition",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `predicate` every `interval` s until it returns something truthy (returned) or `timeout` s pass."""
    deadline = clock() + timeout
    last: object = None
    while True:
        try:
            result = predicate()
            if result:
                return result
            last = result
        except GiveUp:
            raise
        except Exception as exc:  # not up yet: keep it for the message
            last = exc
        remaining = deadline - clock()
        if remaining <= 0:
            raise WaitTimeout(what, timeout, last)
        sleep(min(interval, remaining))
