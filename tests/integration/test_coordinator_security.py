"""Issue 16's coordinator findings, on the real app: client IPs from trusted proxies only (Fly's settings),
failed-auth limits that cannot lock out someone else's valid credential, /healthz and /metrics whose cost does
not grow with the registry, server-side sessions, security headers, bounded refusal audit rows. Requests go
through Starlette's TestClient with a chosen peer address (no server, no sleeping)."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, insert

from admission.main import build_state, create_app, prepare_database
from admission.models import Worker, utcnow
from admission.state import AppState
from rma_ray import credentials
from tests.conftest import ROOT
from tests.integration.conftest import CPU_BOX, make_settings

FLY_ENV = tomllib.loads((ROOT / "cluster_configs" / "fly" / "fly.toml").read_text())["env"]
FLY_PROXY = ("172.19.4.2", 40000)  # a peer inside the Fly proxy's network (fly.toml's RMA_TRUSTED_PROXIES)
TINY = {"cpu_cores": 1, "ram_mb": 1024, "disk_free_gb": 8.0}


def _app(db_url: str, tmp: Path, **overrides: Any) -> tuple[AppState, str, Any]:
    state = build_state(make_settings(db_url, tmp / "data", **overrides))
    admin_key = prepare_database(state)
    assert admin_key
    return state, admin_key, create_app(state=state)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def _statements(state: AppState) -> Iterator[dict[str, int]]:
    """Counts SQL statements sent and Worker rows turned into objects while the block runs."""
    seen = {"statements": 0, "workers_loaded": 0}

    def on_sql(*_: Any) -> None:
        seen["statements"] += 1

    def on_load(*_: Any) -> None:
        seen["workers_loaded"] += 1

    event.listen(state.engine, "before_cursor_execute", on_sql)
    event.listen(Worker, "load", on_load)
    try:
        yield seen
    finally:
        event.remove(state.engine, "before_cursor_execute", on_sql)
        event.remove(Worker, "load", on_load)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_forged_forwarded_for_is_ignored_with_flys_settings(db_url: str, tmp_path: Path) -> None:
    state, admin_key, app = _app(
        db_url,
        tmp_path,
        auth_failure_rate="3/minute",
        trusted_proxies=FLY_ENV["RMA_TRUSTED_PROXIES"],
        client_ip_header=FLY_ENV["RMA_CLIENT_IP_HEADER"],
    )
    proxy = TestClient(app, client=FLY_PROXY)
    direct = TestClient(app, client=("203.0.113.99", 5555))  # reached the machine without Fly's proxy
    victim, attacker = "198.51.100.1", "203.0.113.7"
    bad = _bearer(credentials.mint(credentials.Kind.ADMIN).token)
    forged = {"X-Forwarded-For": victim, "X-Real-IP": victim}

    # through Fly's proxy: the client IP is Fly-Client-IP (which the proxy sets), whatever X-Forwarded-For says
    codes = [
        proxy.get("/api/admin/workers", headers={**bad, **forged, "Fly-Client-IP": attacker}).status_code
        for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]
    # around the proxy: its headers are not believed at all, the peer address is the client
    bad_too = _bearer(credentials.mint(credentials.Kind.ADMIN).token)
    codes = [
        direct.get("/api/admin/workers", headers={**bad_too, **forged, "Fly-Client-IP": victim}).status_code
        for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]
    ok = proxy.post(
        "/api/invites",
        json={},
        headers={**_bearer(admin_key), "Fly-Client-IP": victim, "X-Forwarded-For": attacker},
    )
    assert ok.status_code == 201, ok.text

    audit = proxy.get(
        "/api/admin/audit",
        params={"action": "invite.create"},
        headers={**_bearer(admin_key), "Fly-Client-IP": victim},
    ).json()
    assert [e["ip"] for e in audit] == [victim]
    assert (
        "203.0.113.7"
        in proxy.get("/api/admin/workers", headers={**bad, "Fly-Client-IP": attacker}).json()["error"][
            "message"
        ]
    )

    # the Secure cookie follows X-Forwarded-Proto from the proxy only
    form = {"admin_key": admin_key}
    via_proxy = proxy.post(
        "/registry/login",
        data=form,
        follow_redirects=False,
        headers={"Fly-Client-IP": victim, "X-Forwarded-Proto": "https"},
    )
    assert via_proxy.status_code == 303 and "secure" in via_proxy.headers["set-cookie"].lower()
    assert "max-age=31536000" in via_proxy.headers["strict-transport-security"]
    around = TestClient(app, client=("192.0.2.50", 1)).post(
        "/registry/login", data=form, follow_redirects=False, headers={"X-Forwarded-Proto": "https"}
    )
    assert around.status_code == 303 and "secure" not in around.headers["set-cookie"].lower()
    state.engine.dispose()


def test_other_ips_failures_never_lock_out_a_valid_credential(db_url: str, tmp_path: Path) -> None:
    state, admin_key, app = _app(db_url, tmp_path, auth_failure_rate="5/minute")
    admin = TestClient(app, client=("192.0.2.1", 1))
    invite = admin.post("/api/invites", json={"uses": 1}, headers=_bearer(admin_key)).json()
    donor = TestClient(app, client=("192.0.2.2", 1))
    reg = donor.post(
        "/api/worker/register", json={"name": "d", "capabilities": CPU_BOX}, headers=_bearer(invite["token"])
    )
    assert reg.status_code == 201, reg.text
    node_token = reg.json()["node_token"]
    worker_id = reg.json()["worker_id"]
    admin_id = admin_key.split("_")[2]

    # guesses at the donor's and the admin's secrets from many addresses, two each
    wrong_node = _bearer(f"rma_node_{worker_id}_" + "0" * 64)
    wrong_admin = _bearer(f"rma_admin_{admin_id}_" + "0" * 64)
    for i in range(8):
        at_node = TestClient(app, client=(f"203.0.113.{i + 10}", 1))
        at_admin = TestClient(app, client=(f"203.0.113.{i + 50}", 1))
        # past the credential's budget (5 failures), one guess spends the guessing address's whole budget
        second = 401 if i < 3 else 429
        assert [
            at_node.post("/api/worker/heartbeat", json={}, headers=wrong_node).status_code for _ in range(2)
        ] == [401, second]
        assert [at_admin.get("/api/admin/workers", headers=wrong_admin).status_code for _ in range(2)] == [
            401,
            second,
        ]
    # the owners, from their own addresses, are never refused
    assert donor.post("/api/worker/heartbeat", json={}, headers=_bearer(node_token)).status_code == 200
    assert admin.get("/api/admin/workers", headers=_bearer(admin_key)).status_code == 200

    # an address over its budget is refused before any database work, even on a node-token cache miss
    locked = TestClient(app, client=("203.0.113.15", 1))
    unknown = _bearer(credentials.mint(credentials.Kind.NODE).token)
    with _statements(state) as seen:
        assert locked.post("/api/worker/heartbeat", json={}, headers=unknown).status_code == 429
        assert locked.get("/api/worker/me", headers=unknown).status_code == 429
    assert seen["statements"] == 0
    # a donor behind the same address (a shared NAT) keeps heartbeating: the cache vouches for its token
    assert locked.post("/api/worker/heartbeat", json={}, headers=_bearer(node_token)).status_code == 200
    state.engine.dispose()


def _workers(n: int, start: int, **fields: Any) -> list[dict[str, Any]]:
    now = utcnow()
    return [
        {
            "id": f"w{start + i:011d}",
            "name": f"donor {start + i}",
            "tier": "service",
            "trusted": False,
            "capabilities": CPU_BOX,
            "labels": {},
            "node_token_hash": "0" * 64,
            "registered_ip": "192.0.2.9",
            "created_at": now - timedelta(hours=1),
            "last_heartbeat_at": now,
            "heartbeat_status": "ok",
            "action": "none",
            **fields,
        }
        for i in range(n)
    ]


def test_healthz_and_metrics_cost_does_not_grow_with_the_registry(db_url: str, tmp_path: Path) -> None:
    state, _, app = _app(db_url, tmp_path)
    client = TestClient(app)

    def probe() -> tuple[dict[str, int], str]:
        state.gauges_at = float("-inf")  # past the gauges' few-second cache
        with _statements(state) as seen:
            assert client.get("/healthz").json() == {"status": "ok"}
            text = client.get("/metrics").text
        return seen, text

    with state.engine.begin() as conn:
        conn.execute(insert(Worker), _workers(10, 0))
    small, text = probe()
    assert 'rma_workers{status="healthy",tier="service"} 10.0' in text
    with state.engine.begin() as conn:
        conn.execute(insert(Worker), _workers(4990, 10))
        conn.execute(insert(Worker), _workers(300, 5000, revoked_at=utcnow()))
        conn.execute(insert(Worker), _workers(200, 5300, left_at=utcnow(), last_heartbeat_at=None))
    large, text = probe()
    assert large == small and large["workers_loaded"] == 0, (small, large)
    assert 'rma_workers{status="healthy",tier="service"} 5000.0' in text  # live rows only
    assert 'status="revoked"' not in text and 'status="left"' not in text
    state.gauges_at = time.monotonic()  # scraped just now: a flood of scrapes meanwhile costs no SQL at all
    with _statements(state) as seen:
        for _ in range(5):
            client.get("/metrics")
    assert seen["statements"] == 0
    state.engine.dispose()


def _login(client: TestClient, admin_key: str) -> str:
    r = client.post("/registry/login", data={"admin_key": admin_key}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.cookies["rma_session"]


def test_sessions_need_exp_and_end_at_logout(db_url: str, tmp_path: Path) -> None:
    state, admin_key, app = _app(db_url, tmp_path)
    client = TestClient(app)
    cookie = _login(client, admin_key)
    assert client.get("/registry/metrics").status_code == 200

    claims = jwt.decode(cookie, state.secret_key, algorithms=["HS256"], audience="rma-registry")
    no_exp = jwt.encode({k: v for k, v in claims.items() if k != "exp"}, state.secret_key, algorithm="HS256")
    other = TestClient(app, cookies={"rma_session": no_exp})
    assert other.get("/registry/metrics").status_code == 401
    assert other.get("/registry", follow_redirects=False).headers["location"] == "/registry/login"

    client.post("/registry/logout", follow_redirects=False)
    replay = TestClient(app, cookies={"rma_session": cookie})  # a copy of the cookie taken before logging out
    assert replay.get("/registry/metrics").status_code == 401
    assert replay.get("/registry", follow_redirects=False).status_code == 303
    fresh = TestClient(app)
    _login(fresh, admin_key)  # logging out ended that session only
    assert fresh.get("/registry/metrics").status_code == 200
    state.engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_security_headers_and_no_public_docs(db_url: str, tmp_path: Path) -> None:
    state, admin_key, app = _app(db_url, tmp_path)
    client = TestClient(app)
    _login(client, admin_key)
    for path in ("/registry", "/registry/login", "/healthz"):
        h = client.get(path).headers
        csp = h["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "no-referrer" and "strict-transport-security" not in h  # plain HTTP
    assert 'style="' not in client.get("/registry").text  # nothing the CSP would block
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404
    assert client.get("/api/admin/openapi.json").status_code == 401
    spec = client.get("/api/admin/openapi.json", headers=_bearer(admin_key))
    assert spec.status_code == 200 and "/api/worker/register" in spec.json()["paths"]
    state.engine.dispose()


def test_refused_registrations_write_bounded_audit_rows(db_url: str, tmp_path: Path) -> None:
    state, admin_key, app = _app(db_url, tmp_path)
    admin = TestClient(app, client=("192.0.2.1", 1))
    token = admin.post("/api/invites", json={"uses": 1}, headers=_bearer(admin_key)).json()["token"]
    for ip in ("198.51.100.5", "198.51.100.6"):
        donor = TestClient(app, client=(ip, 1))
        for _ in range(20):  # a refusal does not spend the token: it can be replayed
            r = donor.post(
                "/api/worker/register", json={"name": "small", "capabilities": TINY}, headers=_bearer(token)
            )
            assert r.status_code == 422 and r.json()["error"]["code"] == "hardware_below_minimum"
    rows = admin.get(
        "/api/admin/audit", params={"action": "worker.register.refused"}, headers=_bearer(admin_key)
    ).json()
    assert sorted(e["ip"] for e in rows) == ["198.51.100.5", "198.51.100.6"]  # one a minute per address
    assert all(e["detail"]["count"] == 1 and e["detail"]["code"] == "hardware_below_minimum" for e in rows)
    state.engine.dispose()
