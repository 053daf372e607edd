"""The Serve-side verifier's own logic, fed keyrings by a function (the real coordinator is in integration)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.gateway.keys import ClientKeyVerifier
from deployments.gateway.refusal import Refusal, UnknownKey
from rma_ray import credentials
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
    with pytest.raises(Refusal) as info:
        v.verify(f"Bearer {a.token}")
    assert info.value.status == 401
    assert v.verify(f"Bearer {b.token}").key_id == b.id


@pytest.mark.parametrize(
    "header", [None, "", "Basic abc", "Bearer nope", "Bearer " + credentials.mint(Kind.NODE).token]
)
def test_rejects_missing_and_malformed(header: str | None) -> None:
    v = ClientKeyVerifier(lambda: {"keys": []}, clock=Clock())
    v.refresh()
    with pytest.raises(Refusal) as info:
        v.verify(header)
    assert info.value.status == 401


def test_wrong_secret_for_known_id() -> None:
    a = credentials.mint(Kind.CLIENT)
    forged = f"rma_client_{a.id}_" + "0" * 64
    v = ClientKeyVerifier(lambda: ring(a), clock=Clock())
    v.refresh()
    with pytest.raises(Refusal):
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
    with pytest.raises(Refusal) as info:
        v.verify(f"Bearer {a.token}")
    assert info.value.status == 503


def test_never_loaded_is_503() -> None:
    v = ClientKeyVerifier(lambda: (_ for _ in ()).throw(ConnectionError("down")), clock=Clock())
    with pytest.raises(Refusal) as info:
        v.verify("Bearer " + credentials.mint(Kind.CLIENT).token)
    assert info.value.status == 503


def test_a_key_created_since_the_last_refresh_works_on_its_first_request() -> None:
    """The gateway's check (deployments.gateway.auth.current_client) looks an unknown key id up again at once,
    instead of refusing a freshly created key until the next periodic refresh (10 s)."""
    from starlette.requests import Request

    from deployments.gateway import auth

    old, new = credentials.mint(Kind.CLIENT), credentials.mint(Kind.CLIENT)
    keys = [old]
    fetches: list[int] = []

    def fetch() -> dict:  # type: ignore[type-arg]
        fetches.append(1)
        return ring(*keys)

    v = ClientKeyVerifier(fetch, refresh_s=3600, max_stale_s=3600, unknown_refresh_s=3600)
    v.refresh()
    keys.append(new)  # created at the coordinator after this replica loaded its keyring

    def req(token: str) -> Request:
        return Request(
            {
                "type": "http",
                "method": "GET",
                "path": "/",
                "headers": [(b"authorization", f"Bearer {token}".encode())],
            }
        )

    auth.set_verifier(v)
    try:
        assert asyncio.run(auth.current_client(req(new.token))).key_id == new.id
        assert len(fetches) == 2
        # a wrong secret for a known id is refused without asking the coordinator
        with pytest.raises(Refusal):
            asyncio.run(auth.current_client(req(f"rma_client_{new.id}_{'0' * 64}")))
        assert len(fetches) == 2
        # made-up keys: the one refresh allowed per interval is spent, so no more coordinator fetches
        for _ in range(20):
            with pytest.raises(Refusal) as info:
                asyncio.run(auth.current_client(req(credentials.mint(Kind.CLIENT).token)))
            assert info.value.status == 401
        assert len(fetches) == 2
    finally:
        auth.set_verifier(None)


def test_a_fresh_keys_concurrent_first_requests_all_pass() -> None:
    """Eight requests with a key created since the last refresh arrive together: one refreshes the keyring,
    the others wait for that refresh and check against it (none is refused)."""
    import threading

    from starlette.requests import Request

    from deployments.gateway import auth

    new = credentials.mint(Kind.CLIENT)
    keys: list[credentials.Minted] = []
    release = threading.Event()

    def fetch() -> dict:  # type: ignore[type-arg]
        if keys:  # the refresh the unknown key causes: slow, so the other requests arrive meanwhile
            release.wait(5)
        return ring(*keys)

    v = ClientKeyVerifier(fetch, refresh_s=3600, max_stale_s=3600, unknown_refresh_s=3600)
    v.refresh()
    keys.append(new)
    header = [(b"authorization", f"Bearer {new.token}".encode())]

    async def eight() -> list[str]:
        calls = [
            asyncio.create_task(
                auth.current_client(
                    Request({"type": "http", "method": "GET", "path": "/", "headers": header})
                )
            )
            for _ in range(8)
        ]
        await asyncio.sleep(0.2)  # let all eight reach the key check before the refresh answers
        release.set()
        return [c.key_id for c in await asyncio.gather(*calls)]

    auth.set_verifier(v)
    try:
        assert asyncio.run(eight()) == [new.id] * 8
    finally:
        auth.set_verifier(None)


def test_a_key_created_just_after_another_keys_refresh_waits_for_the_next_one() -> None:
    """Key A's first request refreshes the keyring; key B, created a moment later, arrives within the refresh
    interval: it waits for the next refresh allowed (here 0.3 s) instead of a 401. A made-up key still gets its
    401, after at most that wait, and the coordinator sees one fetch per interval."""
    from starlette.requests import Request

    from deployments.gateway import auth

    a, b = credentials.mint(Kind.CLIENT), credentials.mint(Kind.CLIENT)
    keys: list[credentials.Minted] = []
    fetches: list[int] = []

    def fetch() -> dict:  # type: ignore[type-arg]
        fetches.append(1)
        return ring(*keys)

    v = ClientKeyVerifier(fetch, refresh_s=3600, max_stale_s=3600, unknown_refresh_s=0.3)
    v.refresh()

    def call(token: str) -> str:
        header = [(b"authorization", f"Bearer {token}".encode())]
        request = Request({"type": "http", "method": "GET", "path": "/", "headers": header})
        return asyncio.run(auth.current_client(request)).key_id

    auth.set_verifier(v)
    try:
        keys.append(a)
        assert call(a.token) == a.id and len(fetches) == 2
        keys.append(b)  # created after that refresh, used within its interval
        assert call(b.token) == b.id and len(fetches) == 3
        with pytest.raises(Refusal) as info:
            call(credentials.mint(Kind.CLIENT).token)
        assert info.value.status == 401
    finally:
        auth.set_verifier(None)


def test_unknown_key_refreshes_are_limited_per_interval() -> None:
    clock = Clock()
    fetches: list[int] = []
    v = ClientKeyVerifier(
        lambda: fetches.append(1) or ring(),
        clock=clock,  # type: ignore[func-returns-value]
        unknown_refresh_s=1.0,
    )
    assert v.refresh_for_unknown() and len(fetches) == 1
    assert not v.refresh_for_unknown() and len(fetches) == 1
    clock.now += 1.5
    assert v.refresh_for_unknown() and len(fetches) == 2
    with pytest.raises(Refusal) as info:
        v.verify(f"Bearer {credentials.mint(Kind.CLIENT).token}")
    assert isinstance(info.value, UnknownKey)


def test_a_new_key_is_not_refused_because_one_refresh_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refresh a fresh key causes fails (the coordinator hiccups): the request waits for the next refresh
    allowed and passes, instead of a 401 for a key that exists. With the coordinator down for longer than the
    patience, the answer is a 503 to retry, not a 401 that says the key is wrong."""
    from starlette.requests import Request

    from deployments.gateway import auth

    new = credentials.mint(Kind.CLIENT)
    keys: list[credentials.Minted] = []
    failures = [1]

    def fetch() -> dict:  # type: ignore[type-arg]
        if keys and failures:
            failures.pop()
            raise ConnectionError("coordinator hiccup")
        return ring(*keys)

    v = ClientKeyVerifier(fetch, refresh_s=3600, max_stale_s=3600, unknown_refresh_s=0.2)
    v.refresh()
    keys.append(new)

    def call(token: str) -> str:
        header = [(b"authorization", f"Bearer {token}".encode())]
        request = Request({"type": "http", "method": "GET", "path": "/", "headers": header})
        return asyncio.run(auth.current_client(request)).key_id

    auth.set_verifier(v)
    monkeypatch.setattr(auth, "UNKNOWN_KEY_PATIENCE_S", 1.0)
    try:
        assert call(new.token) == new.id and not failures
        failures.extend([1] * 100)  # down for good
        with pytest.raises(Refusal) as info:
            call(credentials.mint(Kind.CLIENT).token)
        assert info.value.status == 503 and info.value.code == "keyring_unavailable"
    finally:
        auth.set_verifier(None)
