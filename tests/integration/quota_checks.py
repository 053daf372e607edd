"""Client quota checks on a real pool (used by test_services.py, whose module-scoped pool they reuse): the
pool's Redis store holds the shared counters, two gateway replicas sit behind the head's HAProxy, and a real
coordinator ships the keyring and takes the gateway's usage reports."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.support import wait_for


def _key(admin: httpx.Client, name: str, **quota: Any) -> dict[str, Any]:
    """A key born with its quota (a quota set afterwards reaches the replicas with their next keyring refresh:
    a request in between would run on the defaults)."""
    r = admin.post("/api/admin/clients", json={"name": name, **({"quota": quota} if quota else {})})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _reported(admin: httpx.Client, key_id: str, field: str, at_least: int) -> dict[str, Any]:
    def row() -> dict[str, Any] | None:
        got = admin.get("/api/admin/usage").json()
        return next((c for c in got["clients"] if c["key_id"] == key_id and c[field] >= at_least), None)

    return wait_for(row, timeout=30, interval=0.5, what=f"the gateway's usage report of {key_id}")


def check_quota_across_gateway_replicas(api: str, admin: httpx.Client) -> None:
    """A key with 3 requests/minute: of 8 requests, each on its own connection (HAProxy spreads them over
    both gateway replicas; per-replica counters would let up to 6 through), exactly 3 are served, the rest
    get 429 with Retry-After and X-RateLimit-*; the key's usage (refused requests included) reaches the
    coordinator."""
    key = _key(admin, "metered", requests_per_minute=3)
    auth = {"Authorization": f"Bearer {key['key']}"}

    def whoami(_: int) -> httpx.Response:
        return httpx.get(f"{api}/whoami", headers=auth, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(whoami, range(8)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 3 + [429] * 5, [(r.status_code, r.text) for r in replies]
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.headers["X-RateLimit-Limit"] == "3" and refused.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Reset"] == refused.headers["Retry-After"]
    assert _reported(admin, key["id"], "requests", 8)["requests"] == 8

    # uploads: the day's bytes; the upload that would cross the quota is refused and not counted
    up = _key(admin, "uploader", upload_bytes_per_day=1000)
    with httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {up['key']}"}) as c:
        files = {"file": ("a.txt", b"x" * 600, "text/plain")}
        assert c.post("/uploads", files=files).status_code == 201
        r = c.post("/uploads", files=files)
        assert r.status_code == 429 and r.json()["error"]["code"] == "upload_quota_exceeded", r.text
        assert int(r.headers["Retry-After"]) >= 1 and r.headers["X-RateLimit-Remaining"] == "400"
        mine = c.get("/usage").json()
    assert mine["quotas"]["shared"] is True, mine
    assert mine["usage"]["upload_bytes"] == 600 and mine["usage"]["requests"] == 3
    assert mine["remaining"]["upload_bytes_today"] == 400 and mine["quota"]["upload_bytes_per_day"] == 1000


def check_tokens_counted(api: str, admin: httpx.Client) -> None:
    """An LLM call on the LLM's own ingress (/v1, vLLM behind the key gate) counts its tokens against the key,
    in the counters the services gateway reads (GET /api/usage): one set of counters for every ingress."""
    key = _key(admin, "tokens")
    auth = {"Authorization": f"Bearer {key['key']}"}
    base = api.removesuffix("/api")
    with httpx.Client(timeout=120, headers=auth) as c:
        model = c.get(f"{base}/v1/models").json()["data"][0]["id"]
        r = c.post(
            f"{base}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8},
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]

        def counted() -> dict[str, Any] | None:
            mine = c.get(f"{api}/usage").json()
            return mine if mine["usage"]["tokens_out"] >= usage["completion_tokens"] else None

        mine = wait_for(counted, timeout=20, interval=0.3, what="the reply's tokens in the key's usage")
    assert mine["usage"]["tokens_in"] == usage["prompt_tokens"] > 0
    assert mine["usage"]["tokens_out"] == usage["completion_tokens"] > 0
    assert mine["usage"]["requests"] >= 3  # /v1/models, the chat, this /api/usage: all counted, once each


def check_quotas_fail_open(api: str, admin: httpx.Client) -> None:
    """Redis stopped: requests are still served (each replica limits in its own memory), the key's
    /api/usage says the quotas are per replica, and so does the coordinator (the registry page reads it)."""
    key = _key(admin, "redis-down")
    with httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {key['key']}"}) as c:
        assert [c.get("/whoami").status_code for _ in range(4)] == [200] * 4
        mine = wait_for(
            lambda: (m := c.get("/usage").json())["quotas"]["shared"] is False and m,
            timeout=30,
            interval=0.5,
            what="the gateway to say its quotas are per replica",
        )
    assert mine["quotas"]["error"] and mine["quotas"]["per_replica_since"]

    def said() -> dict[str, Any] | None:
        got = admin.get("/api/admin/usage").json()
        return got if not got["shared"] and any(not r["shared"] for r in got["replicas"]) else None

    got = wait_for(said, timeout=30, interval=0.5, what="the coordinator to show per-replica quotas")
    assert all(r["error"] for r in got["replicas"] if not r["shared"])
