"""Client quotas and usage on the gateway side (deployments.gateway.quota), on the per-replica (memory) path and
the fail-open switch; the shared (Redis) path runs against a real Redis in tests/integration/test_quota.py."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from deployments.gateway.auth import ClientDep
from deployments.gateway.keys import ClientKeyVerifier
from deployments.gateway.quota import Meter, Tally, day_of, seconds_to_midnight
from deployments.gateway.refusal import Refusal
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.wire import Quota

NOON = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC).timestamp()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_day_math() -> None:
    assert day_of(NOON) == "2026-12-05"
    assert seconds_to_midnight(NOON) == 12 * 3600
    assert seconds_to_midnight(datetime(2026, 12, 5, 23, 59, 59, 500000, tzinfo=UTC).timestamp()) == 1


def test_requests_per_minute_refused_with_headers() -> None:
    async def go() -> Refusal:
        m = Meter(None)
        for _ in range(3):
            await m.admit("k1", Quota(requests_per_minute=3))
        await m.admit("k2", Quota(requests_per_minute=3))  # another key has its own window
        with pytest.raises(Refusal) as err:
            await m.admit("k1", Quota(requests_per_minute=3))
        assert (await m.usage("k1"))["requests"] == 4  # the refused request is counted too
        return err.value

    r = run(go())
    assert (r.status, r.code) == (429, "rate_limited")
    h = r.headers() or {}
    assert h["X-RateLimit-Limit"] == "3" and h["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(h["X-RateLimit-Reset"]) <= 60 and h["Retry-After"] == h["X-RateLimit-Reset"]
    body = json.loads(r.response("openai").body)
    assert body["error"]["code"] == "rate_limited" and "3 requests" in body["error"]["message"]


def test_no_quota_counts_only() -> None:
    async def go() -> dict[str, int]:
        m = Meter(None)
        for _ in range(50):
            await m.admit("k", Quota())
        await m.add_tokens("k", 7, 11)
        await m.charge_upload("k", Quota(), 1000)
        return await m.usage("k")

    assert run(go()) == {"requests": 50, "tokens_in": 7, "tokens_out": 11, "upload_bytes": 1000}


def test_tokens_per_day_refused_until_midnight() -> None:
    async def go() -> Refusal:
        m = Meter(None, clock=lambda: NOON)
        q = Quota(tokens_per_day=100)
        await m.admit("k", q)
        await m.add_tokens("k", 40, 60)  # the answer that reaches the quota was served
        with pytest.raises(Refusal) as err:
            await m.admit("k", q)
        assert (await m.remaining("k", q))["tokens_today"] == 0
        return err.value

    r = run(go())
    assert (r.status, r.code) == (429, "token_quota_exceeded")
    h = r.headers() or {}
    assert h["Retry-After"] == str(12 * 3600) and h["X-RateLimit-Limit"] == "100"
    assert h["X-RateLimit-Remaining"] == "0"


def test_upload_bytes_per_day() -> None:
    async def go() -> Refusal:
        m = Meter(None, clock=lambda: NOON)
        q = Quota(upload_bytes_per_day=1000)
        await m.charge_upload("k", q, 600)
        with pytest.raises(Refusal) as err:
            await m.charge_upload("k", q, 401)  # would cross the quota: refused, not counted
        await m.charge_upload("k", q, 400)
        assert (await m.usage("k"))["upload_bytes"] == 1000
        return err.value

    r = run(go())
    assert r.status == 429 and "600 of its 1,000 upload bytes" in r.message


class DeadRedis:
    """A Redis client whose server is gone: every command fails as redis-py's does."""

    def __init__(self) -> None:
        self.pings = 0

    async def ping(self) -> bool:
        import redis

        self.pings += 1
        raise redis.ConnectionError("Error 111 connecting to 10.0.0.9:6390. Connection refused.")


def test_fail_open_to_the_replica_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    dead = DeadRedis()
    now = [NOON]

    async def connect() -> DeadRedis:
        return dead

    async def go() -> Meter:
        m = Meter(connect, retry_s=5.0, clock=lambda: now[0])
        q = Quota(requests_per_minute=2)
        await m.admit("k", q)
        await m.admit("k", q)
        with pytest.raises(Refusal):  # still limited, in this replica's memory
            await m.admit("k", q)
        now[0] += 6  # past retry_s: tried again, still down
        await m.usage("k")
        return m

    with caplog.at_level(logging.WARNING, "rma.quota"):
        m = run(go())
    assert dead.pings == 2  # once at first, once after retry_s: not once per request
    state = m.state()
    assert state["shared"] is False and "Connection refused" in state["error"]
    assert state["per_replica_since"].startswith("2026-12-05T12:00")
    fallbacks = [r for r in caplog.records if "fall back" in r.getMessage()]
    assert len(fallbacks) == 1  # said once per outage
    assert m.pending[("2026-12-05", "k")]["requests"] == 3  # kept for the shared counters


def test_tally_json_and_streams() -> None:
    def tally(ctype: bytes, *bodies: bytes, status: int = 200) -> tuple[int, int]:
        t = Tally()
        t.see({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        for b in bodies:
            t.see({"type": "http.response.body", "body": b, "more_body": True})
        return t.tokens() if t.ok else (0, 0)

    reply = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}).encode()
    assert tally(b"application/json", reply[:10], reply[10:]) == (12, 5)
    assert tally(b"application/json", reply, status=400) == (0, 0)
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}\n\n'
    sse = b"text/event-stream; charset=utf-8"
    assert tally(sse, role, chunk, chunk, chunk, usage, b"data: [DONE]\n\n") == (9, 3)
    # no usage chunk asked for: the content chunks are the completion tokens (one split across two writes)
    assert tally(sse, role + chunk[:20], chunk[20:] + chunk, b"data: [DONE]\n\n") == (0, 2)


def test_keyring_quota_reaches_the_identity() -> None:
    minted = credentials.mint(Kind.CLIENT)
    ring = {
        "keys": [
            {
                "id": minted.id,
                "hash": minted.hash,
                "name": "app",
                "quota": {"requests_per_minute": 3, "tokens_per_day": None, "upload_bytes_per_day": 10},
            }
        ]
    }
    v = ClientKeyVerifier(lambda: ring)
    assert v.refresh()
    who = v.verify(f"Bearer {minted.token}")
    assert who.quota == Quota(requests_per_minute=3, upload_bytes_per_day=10)
    del ring["keys"][0]["quota"]  # an older coordinator: no quota
    v.refresh()
    assert v.verify(f"Bearer {minted.token}").quota == Quota()


def test_one_count_per_request_and_the_reply_tokens_through_an_app() -> None:
    """The key check counts a request once (however many dependencies ask for the client), and CountTokens
    adds the reply's usage to the key that the check found; a refused request adds no tokens."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.gateway.auth import AUTH, set_verifier
    from deployments.gateway.quota import CountTokens, set_meter
    from deployments.gateway.refusal import install_refusals

    minted = credentials.mint(Kind.CLIENT)
    ring = {
        "keys": [{"id": minted.id, "hash": minted.hash, "name": "app", "quota": {"requests_per_minute": 3}}]
    }
    verifier = ClientKeyVerifier(lambda: ring)
    verifier.refresh()
    meter = Meter(None)
    app = FastAPI(dependencies=AUTH)
    install_refusals(app, "openai")
    app.add_middleware(CountTokens)

    @app.post("/v1/chat/completions")
    async def chat(client: ClientDep) -> dict[str, Any]:
        return {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}}

    set_verifier(verifier)
    set_meter(meter)
    try:
        with TestClient(app) as c:
            auth = {"Authorization": f"Bearer {minted.token}"}
            assert [c.post("/v1/chat/completions", headers=auth).status_code for _ in range(4)] == [
                200,
                200,
                200,
                429,
            ]
            r = c.post("/v1/chat/completions", headers=auth)
            assert r.status_code == 429 and r.headers["X-RateLimit-Limit"] == "3" and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "rate_limited"
            assert c.post("/v1/chat/completions").status_code == 401
        used = asyncio.run(meter.usage(minted.id))
        assert used == {"requests": 5, "tokens_in": 12, "tokens_out": 18, "upload_bytes": 0}
    finally:
        set_verifier(None)
        set_meter(None)


def test_reports_are_split_under_the_coordinator_s_body_limit() -> None:
    from rma_ray.wire import REPORT_KEYS, UsageReport

    sent: list[UsageReport] = []

    async def go() -> None:
        m = Meter(None, reporter=sent.append)
        await m.report_once()  # no usage yet: one report all the same (the replica's state)
        for i in range(REPORT_KEYS + 5):
            await m.admit(f"key{i:08d}", Quota())
        await m.report_once()

    run(go())
    assert [len(r.usage) for r in sent] == [0, REPORT_KEYS, 5]
    assert all(r.shared is False and r.error == "no shared store configured" for r in sent)
    assert max(len(r.model_dump_json()) for r in sent) < 60 * 1024
    assert sum(u.requests for r in sent for u in r.usage.values()) == REPORT_KEYS + 5


def test_requests_wait_for_the_first_connection_instead_of_slipping_through() -> None:
    """Concurrent first requests on a replica all wait for the shared store's first connection (one attempt):
    none is let through on this replica's memory meanwhile (a 4th request would pass a 3/minute quota)."""
    calls: list[int] = []

    class Store:
        connection_pool = None  # the limits library's storage then makes its own (lazily; never used here)

        def __init__(self, up: bool) -> None:
            self.up = up

        async def ping(self) -> bool:
            if not self.up:
                raise ConnectionError("refused")
            return True

    def connecting(up: bool) -> Any:
        async def connect() -> Store:
            calls.append(1)
            await asyncio.sleep(0.05)  # the endpoint look-up takes a moment
            return Store(up)

        return connect

    async def go(up: bool) -> list[bool]:
        m = Meter(connecting(up), retry_s=60)
        got = await asyncio.gather(*(m._store() for _ in range(5)))
        return [g is not None for g in got]

    assert run(go(True)) == [True] * 5 and len(calls) == 1
    assert run(go(False)) == [False] * 5 and len(calls) == 2  # down: one attempt, the others wait for it
