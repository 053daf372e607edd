"""How a client key is checked: `current_client`, the one check every Serve ingress runs (the services'
routes, the LLM's and embeddings' OpenAI routes, the inference and vision routes, and `ClientKeyGate` in front
of vLLM's own app), so that no client route is reachable without a valid `rma_client_` key.

One `ClientKeyVerifier` (`deployments.gateway.keys`) per replica process, built lazily from this node's
identity (`rma_ray.identity`: the donor's node credential or, on the head, its service credential
`rma_service_`) and refreshed in the background; there is no coordinator round trip per request, and a revoked
key stops working within the refresh interval. Tests and `rma up` may set `RMA_COORDINATOR_URL` +
`RMA_KEYRING_CREDENTIAL_FILE` instead (a 0600 file: never a secret in an env var value).

On an edge cluster's apps (`deployments.gateway.edge_gate`: the replica's runtime env names the edge) the same
check takes the edge service credential the core's gateway sends instead of a client key, and the keyring is
never asked for: the caller is the gateway, whose identity is `edge_gate.EDGE_CALLER` (no client name reaches an edge).

Use it as a FastAPI dependency (`ClientDep`, or `AUTH` on a route) on an app with `install_refusals`
(`deployments.gateway.refusal`): a refusal is a `Refusal`, answered in the app's shape.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from deployments.gateway import edge_gate, quota
from deployments.gateway.keys import KEYRING_RETRY_S, ClientIdentity, ClientKeyVerifier
from deployments.gateway.refusal import Refusal, UnknownKey

_lock = threading.Lock()
_verifier: ClientKeyVerifier | None = None
# longest a request with a not-yet-known key waits for a keyring fetched after it came
UNKNOWN_KEY_PATIENCE_S = 5.0


def coordinator_identity() -> tuple[str, str]:
    """(coordinator URL, this node's credential) for the Serve side's calls to the coordinator (the keyring,
    the edge routes): `RMA_COORDINATOR_URL` + `RMA_KEYRING_CREDENTIAL_FILE`, else the node's own identity."""
    url, cred_file = os.environ.get("RMA_COORDINATOR_URL"), os.environ.get("RMA_KEYRING_CREDENTIAL_FILE")
    if url and cred_file:
        return url, Path(cred_file).read_text().strip()
    from rma_ray.identity import local_identity

    ident = local_identity()
    return ident.coordinator_url, ident.credential


def _build() -> ClientKeyVerifier:
    url, credential = coordinator_identity()
    refresh = float(os.environ.get("RMA_KEYRING_REFRESH_S", "10"))
    return ClientKeyVerifier.from_coordinator(
        url, credential, refresh_s=refresh, max_stale_s=max(30.0, 3 * refresh)
    ).start()


def verifier() -> ClientKeyVerifier:
    global _verifier
    with _lock:
        if _verifier is None:
            _verifier = _build()
        return _verifier


def set_verifier(v: ClientKeyVerifier | None) -> None:
    """For tests of a router outside Serve: use this verifier instead of one built from the node's identity."""
    global _verifier
    with _lock:
        _verifier = v


async def _ready_verifier() -> ClientKeyVerifier:
    """The replica's verifier; its first request builds it (a coordinator fetch) in a thread, off the event
    loop. No identity on this node: fail closed, and say why."""
    if _verifier is not None:
        return _verifier
    try:
        return await asyncio.to_thread(verifier)
    except Exception as exc:
        raise Refusal(
            503, "keyring_unavailable", f"API keys cannot be checked on this replica: {exc}", KEYRING_RETRY_S
        ) from None


async def current_client(request: Request) -> ClientIdentity:
    """The client a request's `Authorization` key acts for, or a Refusal (401 with what to send; 503 when the
    keyring cannot be read). On the event loop: the check is an in-memory hash lookup; a key created since the
    keyring's last refresh is looked up again at once (one refresh, in a thread) instead of being refused
    until the next periodic refresh. A request checked already (an app-wide dependency) is not checked
    twice."""
    done = getattr(request.state, "client", None)
    if isinstance(done, ClientIdentity):
        return done
    if isinstance(done, Refusal):  # refused already (EdgeForward's check, then the route's): the same answer
        raise done
    try:
        client = await _check(request)
    except Refusal as refused:
        request.state.client = refused
        raise
    request.state.client = client
    return client


async def _check(request: Request) -> ClientIdentity:
    edge = edge_gate.verifier()
    if edge is not None:  # an edge app: the gateway's edge credential, never a client key
        await edge.verify(request.headers.get("authorization"))
        return edge_gate.EDGE_CALLER
    v = await _ready_verifier()
    header = request.headers.get("authorization")
    client = await _verify_waiting_for_new_keys(v, header)
    meter = quota.meter()
    if meter is not None:  # counted once per request, here, for every ingress; over its quota: a 429
        await meter.admit(client.key_id, client.quota)
    return client


async def _verify_waiting_for_new_keys(v: ClientKeyVerifier, header: str | None) -> ClientIdentity:
    """`v.verify(header)`, except that a key the keyring does not know is refused only once a keyring fetched
    after this request arrived says so (a key created a moment ago is not refused because the last refresh, or
    a slow or failed one, predates it). Refreshes for unknown keys are one at a time and at most one per
    `unknown_refresh_s` (a flood of made-up keys costs the coordinator one fetch per interval); a request waits
    at most UNKNOWN_KEY_PATIENCE_S, on the loop between fetches (no thread held), and a made-up key gets its 401
    that much later."""
    arrived = v.now()
    try:
        return v.verify(header)
    except UnknownKey:
        pass
    while True:
        # one refresh at a time: a caller that waited for another's refresh (its lock) checks that keyring
        await asyncio.to_thread(v.refresh_for_unknown)
        try:
            return v.verify(header)
        except UnknownKey:
            if v.fetched_since(arrived):
                raise
        wait = v.unknown_refresh_wait()
        if v.now() + wait - arrived > UNKNOWN_KEY_PATIENCE_S:
            if not v.failing:  # no fetch allowed in time: refused on the keyring in hand
                raise UnknownKey()
            raise Refusal(
                503,
                "keyring_unavailable",
                "this API key is newer than the keyring on this replica and the coordinator could not be asked "
                "again in time; retry",
                KEYRING_RETRY_S,
            )
        await asyncio.sleep(wait)


ClientDep = Annotated[ClientIdentity, Depends(current_client)]
AUTH: list[Any] = [Depends(current_client)]  # `dependencies=AUTH` on a route whose handler needs no client
