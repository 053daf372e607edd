"""The Serve-side verifier's own logic, fed keyrings by a function (the real coordinator is in integration)."""

from __future__ import annotations

import pytest

from rma_ray import credentials
from rma_ray.client_keys import ClientKeyVerifier, KeyRejected
from rma_ray.credentials import Kind


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ring(*minted: credentials.Minted) -> dict:  # type: ignore[type-arg]
    return {"keys": [{"id": m.id, "hash": m.hash} for m in minted]}


def test_accepts_live_key_and_drops_revoked_on_refresh() -> None:
    a, b = credentials.mint(Kind.CLIENT), credentials.mint(Kind.CLIENT)
    current = ring(a, b)
    v = ClientKeyVerifier(lambda: current, clock=Clock())
    assert v.refresh()
    assert v.verify(f"Bearer {a.token}").key_id == a.id
    current = ring(b)  # a revoked
    v.refresh()
    with pytest.raises(KeyRejected) as info:
        v.verify(f"Bearer {a.token}")
    assert info.value.status == 401
    assert v.verify(f"Bearer {b.token}").key_id == b.id


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer nope", "Bearer " + credentials.mint(Kind.NODE).token])
def test_rejects_missing_and_malformed(header: str | None) -> None:
    v = ClientKeyVerifier(lambda: {"keys": []}, clock=Clock())
    v.refresh()
    with pytest.raises(KeyRejected) as info:
        v.verify(header)
    assert info.value.status == 401


def test_wrong_secret_for_known_id() -> None:
    a = credentials.mint(Kind.CLIENT)
    forged = f"rma_client_{a.id}_" + "0" * 64
    v = ClientKeyVerifier(lambda: ring(a), clock=Clock())
    v.refresh()
    with pytest.raises(KeyRejected):
        v.verify(f"Bearer {forged}")


def test_fails_closed_when_keyring_goes_stale() -> None:
    a = credentials.mint(Kind.CLIENT)
    clock = Clock()
    healthy = True

    def fetch() -> dict:  # type: ignore[type-arg]
        if not healthy:
            raise ConnectionError("coordinator down")
        return ring(a)

    v = ClientKeyVerifier(fetch, max_stale_s=30, clock=clock)
    v.refresh()
    healthy = False
    clock.now = 20
    assert not v.refresh()
    assert v.verify(f"Bearer {a.token}").key_id == a.id  # still within max_stale_s
    clock.now = 31
    with pytest.raises(KeyRejected) as info:
        v.verify(f"Bearer {a.token}")
    assert info.value.status == 503


def test_never_loaded_is_503() -> None:
    v = ClientKeyVerifier(lambda: (_ for _ in ()).throw(ConnectionError("down")), clock=Clock())
    with pytest.raises(KeyRejected) as info:
        v.verify("Bearer " + credentials.mint(Kind.CLIENT).token)
    assert info.value.status == 503
