"""The edge's ingress gate over real HTTP: an edge app behind `EdgeGate`, the coordinator's JWKS (a real Ed25519
key pair) served by a stand-in coordinator; both by uvicorn on their own ports (module-scoped, ~0.5 s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.requests import Request

from deployments.gateway import auth, edge_gate
from deployments.gateway.edge_gate import EDGE_CALLER, EdgeCredentialVerifier
from deployments.gateway.refusal import Refusal
from rma_ray.edges import EDGE_ISSUER, edge_audience
from tests.support import ServerThread, free_port
from tests.support.edge import EDGE, Coordinator, EdgeApp, mint


@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[Coordinator, str]]:
    c = Coordinator()
    with ServerThread(c.app()) as server:
        yield c, server.url


@pytest.fixture(scope="module")
def edge(coordinator: tuple[Coordinator, str]) -> Iterator[tuple[EdgeApp, EdgeCredentialVerifier, str]]:
    app = EdgeApp()
    verifier = EdgeCredentialVerifier(EDGE, coordinator[1], reload_s=0)
    with ServerThread(app.app(verifier)) as server:
        yield app, verifier, server.url


def call(url: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers=headers, timeout=10)


def test_a_valid_edge_credential_is_let_through(coordinator: Any, edge: Any) -> None:
    coord, _ = coordinator
    _, verifier, url = edge
    before = verifier.counter.counts[(EDGE, "accepted")]
    r = call(url, mint(coord.key))
    assert r.status_code == 200, r.text
    assert r.json()["served"] == "edge"
    assert verifier.counter.counts[(EDGE, "accepted")] == before + 1


OTHER_KEY = Ed25519PrivateKey.generate()


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda key: None, "missing"),
        (lambda key: "rma_client_abc_" + "0" * 64, "a client key"),
        (lambda key: "not.a.jwt", "garbage"),
        (lambda key: mint(key, exp=int(time.time()) - 120, iat=int(time.time()) - 900), "expired"),
        (lambda key: mint(key, aud=edge_audience("other-edge")), "another edge's audience"),
        (lambda key: mint(key, iss="someone-else"), "another issuer"),
        (lambda key: mint(key, exp=None), "no exp"),
        (lambda key: mint(key, iat=None), "no iat"),
        (lambda key: mint(OTHER_KEY), "signed by a key the coordinator does not publish"),
        (
            lambda key: jwt.encode(
                {"iss": EDGE_ISSUER, "aud": edge_audience(EDGE), "iat": int(time.time()), "exp": 2**31},
                "a-shared-secret-of-enough-length-32b",
                algorithm="HS256",
            ),
            "HS256 instead of EdDSA",
        ),
    ],
)
def test_anything_else_is_401_in_openais_shape(coordinator: Any, edge: Any, make: Any, reason: str) -> None:
    coord, _ = coordinator
    app, verifier, url = edge
    seen = len(app.seen)
    r = call(url, make(coord.key))
    assert r.status_code == 401, reason
    error = r.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] in ("missing_edge_credential", "invalid_edge_credential")
    assert r.headers["www-authenticate"] == "Bearer"
    assert len(app.seen) == seen  # the app never saw it


def test_a_rotated_key_is_picked_up_and_the_old_one_retired(coordinator: Any, edge: Any) -> None:
    coord, _ = coordinator
    _, verifier, url = edge
    old = coord.key
    new = Ed25519PrivateKey.generate()
    coord.keys = [new, old]  # the coordinator rotates: current and previous published
    try:
        assert call(url, mint(new)).status_code == 200  # unknown to the cached set: read again at once
        assert call(url, mint(old)).status_code == 200  # still published: tokens minted before still work
        coord.keys = [new]
        assert verifier.load()  # what the gate does once its set is `lifespan_s` old
        assert call(url, mint(old)).status_code == 401  # retired
    finally:
        coord.keys = [old]
        call(url, mint(old))  # the gate re-reads the set for the next tests


def test_keys_that_cannot_be_read_fail_closed_with_503() -> None:
    verifier = EdgeCredentialVerifier(EDGE, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Refusal) as info:
        asyncio.run(verifier.verify("Bearer " + mint(Ed25519PrivateKey.generate())))
    assert info.value.status == 503 and info.value.retry_after_s


def test_an_edge_replica_checks_the_edge_credential_and_never_the_keyring(
    coordinator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge mode from the runtime env an edge app's args give its replicas: `current_client` (the check every
    app runs) takes the edge credential and never builds the keyring verifier (edge nodes are refused it)."""
    coord, url = coordinator
    monkeypatch.setenv(edge_gate.EDGE_NAME_ENV, EDGE)
    monkeypatch.setenv(edge_gate.EDGE_COORDINATOR_ENV, url)
    monkeypatch.setattr(auth, "_build", lambda: pytest.fail("an edge replica asked for the keyring"))
    edge_gate.set_verifier(None)
    auth.set_verifier(None)

    def request(token: str) -> Request:
        headers = [(b"authorization", f"Bearer {token}".encode())]
        return Request({"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": headers})

    try:
        assert asyncio.run(auth.current_client(request(mint(coord.key)))) == EDGE_CALLER
        with pytest.raises(Refusal) as info:
            asyncio.run(auth.current_client(request(mint(coord.key, aud=edge_audience("other")))))
        assert info.value.status == 401
    finally:
        edge_gate.set_verifier(None)


def test_concurrent_requests_on_a_stale_key_set_make_one_fetch(coordinator: Any) -> None:
    """Single-flight: requests that all see a stale set while the coordinator is slow wait for one read of
    the set and share it (not one `fetch_timeout_s` fetch each, one after the other)."""
    coord, url = coordinator
    verifier = EdgeCredentialVerifier(EDGE, url)
    real, fetches = verifier.client.get_jwk_set, []

    def slow_fetch(refresh: bool = False) -> Any:
        fetches.append(1)
        time.sleep(0.3)
        return real(refresh=refresh)

    verifier.client.get_jwk_set = slow_fetch  # type: ignore[method-assign]
    token = "Bearer " + mint(coord.key)

    async def many() -> list[Any]:
        return await asyncio.gather(*(verifier.verify(token) for _ in range(6)))

    claims = asyncio.run(many())
    assert len(claims) == 6 and all(c["iss"] == EDGE_ISSUER for c in claims)
    assert len(fetches) == 1
    assert verifier.load() and len(fetches) == 2  # a later, lone read still fetches
