"""The keyring behind the one client-key check (`deployments.gateway.auth`): client API keys checked on the
Serve side without a coordinator round-trip per request.

The verifier keeps the coordinator's keyring (ids and SHA-256 hashes of live `rma_client_` keys) and refreshes
it every `refresh_s`; a revoked key disappears from the keyring, so it stops working within `refresh_s` plus
one request. If the keyring cannot be refreshed for `max_stale_s`, the verifier fails closed: a coordinator
outage must not keep revoked keys alive.

A key the keyring does not know yet (created since the last refresh) is not refused outright: the caller may
`refresh_for_unknown()` once and check again; such refreshes are one at a time and at most one per
`unknown_refresh_s`, so a flood of made-up keys costs the coordinator one keyring fetch per second per replica.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.gateway.refusal import Refusal, UnknownKey
from rma_ray import credentials
from rma_ray.credentials import Kind, MalformedToken
from rma_ray.wire import Quota

NO_QUOTA = Quota()

log = logging.getLogger("rma.client_keys")
KEYRING_RETRY_S = 5.0  # Retry-After of a refusal because the keyring cannot be read


@dataclass(frozen=True)
class ClientIdentity:
    key_id: str
    client: str = (
        ""  # the name the key was created with (`rma clients create <name>`): the client it acts for
    )
    sensitive: bool = (
        False  # a key created as sensitive (the keyring says): its requests never leave the core
    )
    # the key's effective quota, as the keyring says (deployments.gateway.quota enforces it)
    quota: Quota = field(default_factory=Quota, compare=False)


class ClientKeyVerifier:
    def __init__(
        self,
        fetch: Callable[[], dict[str, Any]],
        refresh_s: float = 10.0,
        max_stale_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        unknown_refresh_s: float = 1.0,
    ) -> None:
        self._fetch = fetch
        self.refresh_s, self.max_stale_s, self.unknown_refresh_s = refresh_s, max_stale_s, unknown_refresh_s
        self._unknown_lock = threading.Lock()
        self._unknown_at: float | None = None
        self._clock = clock
        self._hashes: dict[str, str] = {}
        self._names: dict[str, str] = {}
        self._sensitive: frozenset[str] = frozenset()
        self._quotas: dict[str, Quota] = {}
        self._loaded_at: float | None = None
        self._fetched_from: float | None = None  # when the fetch behind the current keyring began
        self.failing = False  # the last fetch failed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_coordinator(cls, base_url: str, credential: str, **kwargs: Any) -> ClientKeyVerifier:
        from rma_ray.client import AdmissionClient

        client = AdmissionClient(base_url, credential, timeout=5.0)
        return cls(client.keyring, **kwargs)

    def refresh(self) -> bool:
        started = self._clock()
        try:
            ring = self._fetch()
            hashes = {e["id"]: e["hash"] for e in ring["keys"]}
            names = {e["id"]: e.get("name", "") for e in ring["keys"]}
            sensitive = frozenset(e["id"] for e in ring["keys"] if e.get("sensitive") is True)
            quotas = {e["id"]: Quota.model_validate(e["quota"]) for e in ring["keys"] if e.get("quota")}
        except Exception as exc:  # keep the last keyring until it goes stale
            log.warning("client keyring refresh failed: %s", exc)
            self.failing = True
            return False
        with self._lock:
            self._hashes, self._names, self._loaded_at = hashes, names, self._clock()
            self._fetched_from, self.failing = started, False
            self._sensitive, self._quotas = sensitive, quotas
        return True

    def fetched_since(self, t: float) -> bool:
        """True when the keyring in hand was fetched by a request to the coordinator that began at or after `t`
        (a key created before `t` is in it, unless revoked)."""
        at = self._fetched_from
        return at is not None and at >= t

    def now(self) -> float:
        return self._clock()

    def unknown_refresh_wait(self) -> float:
        """Seconds until `refresh_for_unknown` may fetch again (0: now)."""
        at = self._unknown_at
        return 0.0 if at is None else max(0.0, self.unknown_refresh_s - (self._clock() - at))

    def refresh_for_unknown(self) -> bool:
        """Refresh now because a request carried a key id this keyring does not know; False when a refresh of this
        kind ran less than `unknown_refresh_s` ago (concurrent callers wait for the one in flight, then see its
        keyring) or the fetch failed. Blocking: call it off the event loop."""
        with self._unknown_lock:
            now = self._clock()
            if self._unknown_at is not None and now - self._unknown_at < self.unknown_refresh_s:
                return False
            self._unknown_at = now
            return self.refresh()

    def start(self) -> ClientKeyVerifier:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="rma-keyring", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def verify(self, authorization: str | None) -> ClientIdentity:
        """Check an `Authorization` header value; raise Refusal (401/503, with a message for the caller;
        UnknownKey for a well-formed key whose id is not in the keyring)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Refusal(401, "missing_api_key", "send 'Authorization: Bearer rma_client_<id>_<secret>'")
        try:
            parsed = credentials.parse(authorization[7:].strip(), Kind.CLIENT)
        except MalformedToken as exc:
            raise Refusal(401, "invalid_api_key", str(exc)) from None
        with self._lock:
            loaded_at, stored, name, sensitive, quota = (
                self._loaded_at,
                self._hashes.get(parsed.id),
                self._names.get(parsed.id, ""),
                parsed.id in self._sensitive,
                self._quotas.get(parsed.id, NO_QUOTA),
            )
        if loaded_at is None or self._clock() - loaded_at > self.max_stale_s:
            raise Refusal(
                503,
                "keyring_stale",
                "API keys cannot be checked right now (coordinator unreachable)",
                KEYRING_RETRY_S,
            )
        if stored is None:
            raise UnknownKey()
        if not hmac.compare_digest(credentials.hash_secret(parsed.secret), stored):
            raise Refusal(401, "invalid_api_key", "unknown or revoked API key")
        return ClientIdentity(parsed.id, name, sensitive, quota)
