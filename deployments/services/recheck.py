"""When a replica asks its store's endpoint again. A store can move (`rma stores move`, or its supervisor
restarted by Ray on another data donor) and come back at another address; a replica that kept its first one
would be refused until it is redeployed. So a client of a store asks again after a connection to it failed, at
most every `every_s` (each ask is a call to the store's supervisor), and never because a request went well."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rma.services.recheck")


class Recheck:
    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self._failed = False
        self._asked = time.monotonic()
        self._lock = threading.Lock()

    def failed(self) -> None:
        """A connection to the store failed: the endpoint is worth asking again."""
        self._failed = True

    def asked(self) -> None:
        """The endpoint was just asked (a client made from its answer)."""
        self._failed, self._asked = False, time.monotonic()

    def due(self) -> bool:
        """Whether to ask now; True once per failure and `every_s` (the caller asks, then or never)."""
        with self._lock:
            if not self._failed or time.monotonic() - self._asked < self.every_s:
                return False
            self.asked()
            return True

    def moved(self, endpoint: Callable[[str], Any], store: str, current: tuple[Any, ...]) -> Any | None:
        """When due (`due()`): the store's endpoint if its address is no longer `current`; None when not due, at
        the same address, or not answered (its supervisor being restarted: the old address stays)."""
        if not self.due():
            return None
        try:
            ep = endpoint(store)
        except Exception as exc:
            log.warning("the %s store's endpoint could not be asked: %s: %s", store, type(exc).__name__, exc)
            return None
        if address(ep) == current:
            return None
        log.warning("the %s store moved to %s:%s: a new client", store, ep.host, ep.port)
        return ep


def address(ep: Any) -> tuple[Any, ...]:
    """What a client of the store was made from: a change means a new client."""
    return tuple(getattr(ep, name, None) for name in ("host", "port", "user", "password", "database"))
