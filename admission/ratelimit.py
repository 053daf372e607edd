"""Per-IP limits on registration and on failed authentication (the `limits` library, moving window)."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from admission.errors import ApiError


class IpLimiter:
    def __init__(self, register_rate: str, auth_failure_rate: str) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.register: RateLimitItem = parse(register_rate)
        self.auth_failure: RateLimitItem = parse(auth_failure_rate)
        # IPs with a failure inside the window; the common case (no failures) skips the limiter entirely
        self._failed_at: dict[str, float] = {}

    def _too_many(self, item: RateLimitItem, ip: str, what: str) -> ApiError:
        reset = self._limiter.get_window_stats(item, ip).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        return ApiError(429, "rate_limited", f"too many {what} from {ip}; retry in {retry} s",
                        headers={"Retry-After": str(retry)})

    def hit_register(self, ip: str) -> None:
        if not self._limiter.hit(self.register, ip):
            raise self._too_many(self.register, ip, "registrations")

    def check_auth_allowed(self, ip: str) -> None:
        """Refuse an IP that has failed authentication too often, before looking at its credential."""
        last = self._failed_at.get(ip)
        if last is None:
            return
        if time.time() - last > self.auth_failure.get_expiry():
            self._failed_at.pop(ip, None)
            return
        if not self._limiter.test(self.auth_failure, ip):
            raise self._too_many(self.auth_failure, ip, "failed authentications")

    def record_auth_failure(self, ip: str) -> None:
        self._failed_at[ip] = time.time()
        self._limiter.hit(self.auth_failure, ip)
