"""Limits on registration, failed authentication and refusal audit rows (the `limits` library, moving window).

Failed authentications are counted per client IP and per credential id. An IP over its budget is refused
without database work (admission.security lets through only a credential its memory already vouches for). A
credential id over its budget (guessed at from many IPs) refuses no one: its owner's valid secret still works,
but every further failure on it spends the whole budget of the IP that made it, so each guessing IP gets one try
a window. So only an IP's own failures can ever
refuse it, and the client IP is only what `admission.proxy` lets a trusted proxy say it is."""

from __future__ import annotations

import math
import threading
import time

from limits import RateLimitItem, RateLimitItemPerMinute, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from admission.errors import ApiError


class IpLimiter:
    def __init__(self, register_rate: str, auth_failure_rate: str) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.register: RateLimitItem = parse(register_rate)
        self.auth_failure: RateLimitItem = parse(auth_failure_rate)
        self.refusal_audit: RateLimitItem = RateLimitItemPerMinute(1)
        # IPs with a failure inside the window; the common case (no failures) skips the limiter entirely
        self._failed_at: dict[str, float] = {}
        self._lock = threading.Lock()
        # '<kind>:<ip>' -> (refusals without a row, last one at)
        self._unaudited: dict[str, tuple[int, float]] = {}

    def _too_many(self, item: RateLimitItem, ip: str, what: str) -> ApiError:
        reset = self._limiter.get_window_stats(item, "ip", ip).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        return ApiError(
            429,
            "rate_limited",
            f"too many {what} from {ip}; retry in {retry} s",
            headers={"Retry-After": str(retry)},
        )

    def hit_register(self, ip: str) -> None:
        if not self._limiter.hit(self.register, "ip", ip):
            raise self._too_many(self.register, ip, "registrations")

    def check_auth_allowed(self, ip: str) -> None:
        """Refuse an IP that has itself failed authentication too often, before looking at its credential."""
        last = self._failed_at.get(ip)
        if last is None:
            return
        if time.time() - last > self.auth_failure.get_expiry():
            self._failed_at.pop(ip, None)
            return
        if not self._limiter.test(self.auth_failure, "ip", ip):
            raise self._too_many(self.auth_failure, ip, "failed authentications")

    def record_auth_failure(self, ip: str, credential: str | None = None) -> None:
        """Count a failure against the IP and, when the request named one, the credential id ('node:<id>')."""
        self._failed_at[ip] = time.time()
        cost = 1
        if credential is not None and not self._limiter.hit(self.auth_failure, "credential", credential):
            # a credential under attack: this IP has had its one guess (fill what is left of its budget)
            cost = max(1, self._limiter.get_window_stats(self.auth_failure, "ip", ip).remaining)
        self._limiter.hit(self.auth_failure, "ip", ip, cost=cost)

    def audit_refusal(self, ip: str, what: str = "register") -> int | None:
        """None while this IP already got a refusal row of this kind (register, rejoin) this minute; else how many
        refusals the row stands for."""
        now = time.time()
        key = f"{what}:{ip}"
        with self._lock:
            count, _ = self._unaudited.pop(key, (0, now))
            if self._limiter.hit(self.refusal_audit, "refusal", what, ip):
                return count + 1
            self._unaudited[key] = (count + 1, now)
            if len(self._unaudited) > 10_000:  # bounded: forget counts idle for over a window
                horizon = now - self.refusal_audit.get_expiry()
                self._unaudited = {k: v for k, v in self._unaudited.items() if v[1] > horizon}
            return None
