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
UNKNOWN_KEY_PATIENCE_S = 1.5  # longest a request with a not-yet-known key waits for the next keyring refresh


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
    edge = edge_gate.verifier()
    if edge is not None:  # an edge app: the gateway's edge credential, never a client key
        await edge.verify(request.headers.get("authorization"))
        request.state.client = edge_gate.EDGE_CALLER
        return edge_gate.EDGE_CALLER
    v = await _ready_verifier()
    header = request.headers.get("authorization")
    try:
        client = v.verify(header)
    except UnknownKey:
        # one refresh at a time: a request that waited for another's refresh checks against that keyring (a
        # fresh key's first requests arrive together: each must see it, not only the one that refreshed)
        await asyncio.to_thread(v.refresh_for_unknown)
        try:
            client = v.verify(header)
        except UnknownKey:
            # the keyring was refreshed for another unknown key a moment ago, before this one existed: wait for
            # the next refresh allowed (on the loop, no thread held; made-up keys still cost the coordinator at
            # most one fetch per interval, and get their 401 a moment later)
            wait = v.unknown_refresh_wait()
            if not 0 < wait <= UNKNOWN_KEY_PATIENCE_S:
                raise
            await asyncio.sleep(wait)
            await asyncio.to_thread(v.refresh_for_unknown)
            client = v.verify(header)
    meter = quota.meter()
    if meter is not None:  # counted once per request, here, for every ingress; over its quota: a 429
        await meter.admit(client.key_id, client.quota)
    request.state.client = client
    return client


ClientDep = Annotated[ClientIdentity, Depends(current_client)]
AUTH: list[Any] = [Depends(current_client)]  # `dependencies=AUTH` on a route whose handler needs no client
