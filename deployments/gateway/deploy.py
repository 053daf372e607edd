"""Serve-side deploy helpers for drivers that run apps themselves (tests, benches): wait until applications run,
delete them and wait until they are gone. Call them from a driver connected to the pool (`ray.init(address=...)`
first)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from rma_ray.waiting import GiveUp, wait_until

log = logging.getLogger("rma.gateway.deploy")


class AppFailed(GiveUp, RuntimeError):
    """A Serve application went DEPLOY_FAILED or UNHEALTHY: waiting longer cannot help."""


def wait_running(apps: list[str], timeout_s: float) -> None:
    """Return once every app in `apps` is RUNNING; raise AppFailed (a RuntimeError) with Serve's message when
    one failed, and a TimeoutError naming each app's state after `timeout_s`."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    def running() -> bool:
        status = serve.status().applications
        states = {a: status[a].status if a in status else "MISSING" for a in apps}
        failed = [
            a
            for a, s in states.items()
            if s in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)
        ]
        if failed:
            raise AppFailed(f"Serve app {failed[0]} failed: {status[failed[0]].message[-2000:]}")
        if all(s == ApplicationStatus.RUNNING for s in states.values()):
            return True
        raise _NotYet(json.dumps(states, default=str))

    wait_until(running, timeout=timeout_s, interval=1.0, what=f"Serve apps {', '.join(apps)} to be RUNNING")


class _NotYet(Exception):
    """The apps' states while not all are running (the timeout's message shows the last one)."""


def delete_apps(apps: Iterable[str], *, timeout_s: float | None = None) -> None:
    """Delete applications (Serve stops their replicas; an app already gone is fine). With `timeout_s`, all
    are deleted at once and waited for together; without, one after the other, each with Serve's own wait."""
    from ray import serve

    names = list(apps)
    for app in names:
        try:
            serve.delete(app, _blocking=timeout_s is None)
        except Exception as exc:  # already gone
            log.debug("Serve app %s not deleted: %s", app, exc)
    if timeout_s is not None:
        wait_until(
            lambda: not any(a in serve.status().applications for a in names),
            timeout=timeout_s,
            interval=0.5,
            what=f"Serve apps {', '.join(names)} to be deleted",
        )


def app_status(app: str) -> Any:
    """Serve's status of one application, or None when it is not deployed."""
    from ray import serve

    return serve.status().applications.get(app)
