"""Client-key authentication shared by every Serve ingress (the LLM's OpenAI routes and the RMA services), so that
no client route is reachable without a valid `rma_client_` key.

One `ClientKeyVerifier` per replica process, built lazily from this node's identity (`rma_ray.identity`: the
donor's node credential or, on the head, its service credential `rma_service_`) and refreshed in the
background; there is no coordinator round trip per request, and a revoked key stops working within the refresh
interval. Tests and `rma up` may set `RMA_COORDINATOR_URL` + `RMA_KEYRING_CREDENTIAL_FILE` instead (a 0600
file: never a secret in an env var value).

Use it as a FastAPI dependency (`ClientDep`) and install one of the error handlers so that a refusal has the shape
the route's clients expect: `{"error": {"code", "message"}}` on /api, OpenAI's `{"error": {"message", "type",
"code"}}` on /v1.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from rma_ray.client_keys import ClientIdentity, ClientKeyVerifier, KeyRejected

_lock = threading.Lock()
_verifier: ClientKeyVerifier | None = None


def _build() -> ClientKeyVerifier:
    url, cred_file = os.environ.get("RMA_COORDINATOR_URL"), os.environ.get("RMA_KEYRING_CREDENTIAL_FILE")
    if url and cred_file:
        credential = Path(cred_file).read_text().strip()
    else:
        from rma_ray.identity import local_identity

        ident = local_identity()
        url, credential = ident.coordinator_url, ident.credential
    refresh = float(os.environ.get("RMA_KEYRING_REFRESH_S", "10"))
    return ClientKeyVerifier.from_coordinator(url, credential, refresh_s=refresh,
                                              max_stale_s=max(30.0, 3 * refresh)).start()


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


def _check(request: Request) -> ClientIdentity:
    try:
        v = verifier()
    except Exception as exc:  # no identity on this node: fail closed, say why
        raise KeyRejected(503, "keyring_unavailable", f"API keys cannot be checked on this replica: {exc}") from None
    client = v.verify(request.headers.get("authorization"))
    request.state.client = client
    return client


def require_client(request: Request) -> ClientIdentity:
    """The sync check (FastAPI runs it in a worker thread): a key created since the keyring's last refresh is
    looked up again at once instead of being refused until the next periodic refresh."""
    try:
        return _check(request)
    except KeyRejected as exc:
        if not exc.unknown_id or not verifier().refresh_for_unknown():
            raise
    return _check(request)


async def require_client_on_loop(request: Request) -> ClientIdentity:
    """The same check on the event loop: the hash lookup inline, a refresh for an unknown key in a thread."""
    try:
        return _check(request)
    except KeyRejected as exc:
        if not exc.unknown_id or not await asyncio.to_thread(verifier().refresh_for_unknown):
            raise
    return _check(request)


async def current_client(request: Request) -> ClientIdentity:
    """`require_client` as an async dependency: FastAPI runs a sync one in a worker thread per request, and the
    check is an in-memory hash lookup. The replica's first request builds the keyring (a coordinator fetch) in a
    thread, off the event loop; a request that was checked already (an app-wide dependency) is not checked twice."""
    done = getattr(request.state, "client", None)
    if isinstance(done, ClientIdentity):
        return done
    if _verifier is None:
        try:
            await asyncio.to_thread(verifier)
        except Exception:  # _check answers 503 with the reason
            pass
    return await require_client_on_loop(request)


ClientDep = Annotated[ClientIdentity, Depends(current_client)]


def rma_error_handler(app: FastAPI) -> None:
    """Refusals as `{"error": {"code", "message"}}` (the coordinator's and the services' shape)."""

    @app.exception_handler(KeyRejected)
    async def _rejected(request: Request, exc: KeyRejected) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status,
                            headers=_headers(exc))


def openai_error_handler(app: FastAPI) -> None:
    """Refusals as OpenAI error bodies, so the `openai` client raises AuthenticationError with the message."""

    @app.exception_handler(KeyRejected)
    async def _rejected(request: Request, exc: KeyRejected) -> JSONResponse:
        return openai_refusal(exc)


def openai_refusal(exc: KeyRejected) -> JSONResponse:
    """A key refusal as an OpenAI error body (also used outside FastAPI, by the LLM replica's ASGI key gate)."""
    kind = "authentication_error" if exc.status == 401 else "service_unavailable"
    return JSONResponse({"error": {"message": exc.message, "type": kind, "param": None, "code": exc.code}},
                        status_code=exc.status, headers=_headers(exc))


def _headers(exc: KeyRejected) -> dict[str, Any]:
    if exc.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return {"Retry-After": "5"}
