"""The edge's ingress check: on an edge cluster's Serve apps the caller is the core's gateway, never a client,
so the request carries the edge service credential instead of a client key (DESIGN.md, "Trust domains").

The credential is a short-lived EdDSA JWT the coordinator mints (issuer `EDGE_ISSUER`, audience
`edge_audience(name)`, `exp`/`iat` required) and checks nothing else: no client key, no client name and no
coordinator secret ever reach an edge node. It is verified against the coordinator's public keys for this edge
(`jwks_path(name)`, no credential needed), read with PyJWT's `PyJWKClient` and cached; during a rotation the set
holds the current and the previous key, so every key of the set is tried. A token no key verifies makes one
re-read of the set (at most one per `reload_s`): a key rotated since the last read is picked up at once.

An edge app's replica is in edge mode when its runtime env names the edge (`RMA_EDGE_NAME`) and the
coordinator (`RMA_EDGE_COORDINATOR_URL`): the app's args carry both (no secret), and `deployments.gateway.auth`
then checks this credential instead of a client key, and never asks the coordinator for the keyring (edge
nodes are refused it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt

from deployments.gateway.keys import ClientIdentity
from deployments.gateway.refusal import Refusal
from rma_ray.edges import EDGE_ISSUER, edge_audience, jwks_path

log = logging.getLogger("rma.edge_gate")

EDGE_NAME_ENV = "RMA_EDGE_NAME"
EDGE_COORDINATOR_ENV = "RMA_EDGE_COORDINATOR_URL"
KEYS_RETRY_S = 5.0  # Retry-After while the coordinator's public keys cannot be read
LEEWAY_S = 5.0  # clock skew between the coordinator and an edge node
REQUIRED = ["exp", "iat", "aud", "iss"]
EDGE_CALLER = ClientIdentity("edge-gateway")  # who an edge app's request comes from: the core's gateway


class Counter:
    """A Ray metric (exported by the node's metrics agent; Prometheus adds `ray_`) and the same counts in the
    process (`counts`, for tests and status). Counting never fails a request."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.tag_keys = tag_keys
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        try:
            from ray.util.metrics import Counter as RayCounter

            self._metric: Any = RayCounter(name, description=description, tag_keys=tag_keys)
        except Exception:  # no Ray here: the process counts still work
            self._metric = None

    def inc(self, *tags: str) -> None:
        self.counts[tags] += 1
        if self._metric is not None:
            try:
                self._metric.inc(1, tags=dict(zip(self.tag_keys, tags, strict=True)))
            except Exception:
                pass


def edge_env(name: str | None, coordinator_url: str | None, app: str = "an edge app") -> dict[str, str]:
    """The runtime env vars that put an edge app's replica in edge mode (`deployments.gateway.auth`); none for a
    core app (`name` None). `app` names it in the error when the coordinator URL is missing."""
    if not name:
        return {}
    if not coordinator_url:
        raise ValueError(f"{app} needs edge_coordinator_url (the coordinator that publishes its keys)")
    return {EDGE_NAME_ENV: name, EDGE_COORDINATOR_ENV: coordinator_url.rstrip("/")}


def edge_mode() -> tuple[str, str] | None:
    """(edge name, coordinator URL) when this process serves an edge app, else None."""
    name, url = os.environ.get(EDGE_NAME_ENV), os.environ.get(EDGE_COORDINATOR_ENV)
    return (name, url) if name and url else None


class EdgeCredentialVerifier:
    """Checks `Authorization: Bearer <edge JWT>` for edge `name` against the coordinator's JWKS."""

    def __init__(
        self,
        name: str,
        coordinator_url: str,
        *,
        lifespan_s: float = 60.0,
        reload_s: float = 5.0,
        fetch_timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.audience = name, edge_audience(name)
        self.url = coordinator_url.rstrip("/") + jwks_path(name)
        self.client = jwt.PyJWKClient(self.url, lifespan=lifespan_s, timeout=fetch_timeout_s)
        self.lifespan_s, self.reload_s, self._clock = lifespan_s, reload_s, clock
        self._keys: list[jwt.PyJWK] = []
        self._loaded_at: float | None = None
        self._lock = threading.Lock()
        self._attempts = 0  # reads of the key set ended (under `_lock`), for the single-flight in load()
        self._last_ok = False  # whether the last of them succeeded
        self.counter = Counter(
            "rma_edge_gate_requests",
            "requests an edge cluster's ingress checked, by outcome (accepted, refused)",
            ("edge", "outcome"),
        )

    def load(self, max_age: float | None = None) -> bool:
        """Read the key set now (blocking: off the event loop). False when it cannot be read; the last set is
        kept until it is older than `lifespan_s`.

        Single-flight: a caller that waited on the lock while another read the set takes that read's result
        instead of fetching again (n requests that see a stale set while the coordinator is slow make one
        fetch, not n of `fetch_timeout_s` each): the set is no longer older than `max_age` (when given), or
        a read ended (well or not) since this caller came."""
        seen = self._attempts
        with self._lock:
            if max_age is not None and not self._stale(max_age):
                return True
            if self._attempts != seen:
                return self._last_ok
            try:
                keys = [
                    k
                    for k in self.client.get_jwk_set(refresh=True).keys
                    if k.public_key_use in ("sig", None) and k.algorithm_name == "EdDSA"
                ]
            except (jwt.PyJWKClientError, jwt.exceptions.PyJWKSetError) as exc:
                log.warning("edge %s: cannot read the coordinator's keys at %s: %s", self.name, self.url, exc)
                self._attempts, self._last_ok = self._attempts + 1, False
                return False
            self._keys, self._loaded_at = keys, self._clock()
            self._attempts, self._last_ok = self._attempts + 1, True
            return True

    def _stale(self, age: float) -> bool:
        return self._loaded_at is None or self._clock() - self._loaded_at > age

    def _decode(self, token: str) -> dict[str, Any]:
        if not self._keys:
            raise jwt.InvalidSignatureError("no key")
        last: jwt.InvalidTokenError = jwt.InvalidSignatureError("no key verifies it")
        kid = jwt.get_unverified_header(token).get("kid")  # a hint only: the key named first, then the others
        for key in sorted(self._keys, key=lambda k: k.key_id != kid):
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=["EdDSA"],
                    audience=self.audience,
                    issuer=EDGE_ISSUER,
                    leeway=LEEWAY_S,
                    options={"require": REQUIRED},
                )
            except jwt.InvalidSignatureError as exc:  # another key of the set may have signed it
                last = exc
        raise last

    async def verify(self, authorization: str | None) -> dict[str, Any]:
        """The token's claims, or a Refusal: 401 for anything but a valid credential for this edge (the
        reason in the message), 503 while the coordinator's keys cannot be read."""
        try:
            claims = await self._verify(authorization)
        except Refusal:
            self.counter.inc(self.name, "refused")
            raise
        self.counter.inc(self.name, "accepted")
        return claims

    async def _verify(self, authorization: str | None) -> dict[str, Any]:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Refusal(
                401, "missing_edge_credential", "this is an edge cluster: only the pool's gateway calls it"
            )
        token = authorization[7:].strip()
        if self._stale(self.lifespan_s):
            await asyncio.to_thread(self.load, self.lifespan_s)
        if self._stale(max(self.lifespan_s * 3, 180.0)):  # never read, or unreadable for long: fail closed
            raise Refusal(
                503, "edge_keys_unavailable", "the edge credential cannot be checked right now", KEYS_RETRY_S
            )
        try:
            try:
                return self._decode(token)
            except jwt.InvalidSignatureError:
                if not self._stale(self.reload_s) or not await asyncio.to_thread(self.load, self.reload_s):
                    raise
                return self._decode(token)  # a key rotated since the last read
        except jwt.InvalidTokenError as exc:
            raise Refusal(401, "invalid_edge_credential", f"edge credential refused: {exc}") from None


_lock = threading.Lock()
_verifier: EdgeCredentialVerifier | None = None


def verifier() -> EdgeCredentialVerifier | None:
    """This process's edge verifier when it serves an edge app (`edge_mode()`), else None."""
    global _verifier
    mode = edge_mode()
    with _lock:
        if _verifier is None and mode is not None:
            _verifier = EdgeCredentialVerifier(*mode)
        return _verifier


def set_verifier(v: EdgeCredentialVerifier | None) -> None:
    """For tests outside Serve: check edge credentials with this verifier (None: back to the environment)."""
    global _verifier
    with _lock:
        _verifier = v


class EdgeGate:
    """ASGI middleware: an app that only the core's gateway may call (an edge app), with `verifier` (default:
    this process's, from its runtime env). A request with a valid edge credential goes on as `EDGE_CALLER`
    (the key check downstream, `deployments.gateway.auth.current_client`, then takes it as done); anything
    else is a 401 in OpenAI's shape (503 while the keys cannot be read)."""

    def __init__(self, app: Any, verifier: EdgeCredentialVerifier | None = None) -> None:
        self.app, self._verifier = app, verifier

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        v = self._verifier or verifier()
        if v is None:
            refusal = Refusal(503, "edge_gate_unconfigured", "this edge app does not know its edge name")
            await refusal.response("openai")(scope, receive, send)
            return
        header = next((val.decode("latin-1") for k, val in scope["headers"] if k == b"authorization"), None)
        try:
            await v.verify(header)
        except Refusal as exc:
            await exc.response("openai")(scope, receive, send)
            return
        scope.setdefault("state", {})["client"] = EDGE_CALLER
        await self.app(scope, receive, send)
