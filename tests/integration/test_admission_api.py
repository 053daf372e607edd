"""The coordinator's contract, against the real app on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import re
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from admission.models import AuditEvent, Invite, Worker
from rma_ray import credentials
from tests.integration.conftest import CPU_BOX, Coordinator
from tests.support import wait_for

H200 = {
    "cpu_cores": 16,
    "ram_mb": 128887,
    "disk_free_gb": 64.0,
    "gpus": [{"name": "NVIDIA H200", "memory_mb": 143771, "uuid": "GPU-x", "compute_capability": "9.0"}],
}
TINY = {"cpu_cores": 1, "ram_mb": 1024, "disk_free_gb": 8.0}


def error(resp: httpx.Response) -> tuple[str, str]:
    body = resp.json()["error"]
    return body["code"], body["message"]


def test_invite_token_shown_once_and_only_hash_stored(coordinator: Coordinator) -> None:
    inv = coordinator.invite()
    assert inv["token"].startswith(f"rma_join_{inv['id']}_") and inv["uses"] == 1
    expires = datetime.fromisoformat(inv["expires_at"])
    assert timedelta(minutes=14) < expires - datetime.now(UTC) <= timedelta(minutes=15)
    with coordinator.state.sessions() as s:
        row = s.get(Invite, inv["id"])
        assert row is not None and inv["token"].split("_")[3] not in (row.token_hash, row.note)
    listed = coordinator.admin("GET", "/api/invites").json()
    assert listed[0]["id"] == inv["id"] and "token" not in listed[0]


def test_register_returns_credentials_and_labels(coordinator: Coordinator) -> None:
    reg = coordinator.join(trusted=True)
    assert reg["tier"] == "service" and reg["tier_number"] == 2
    assert reg["labels"] == {
        "rma.io/tier": "service",
        "rma.io/node": reg["worker_id"],
        "rma.io/trusted": "true",
    }
    assert reg["node_token"].startswith(f"rma_node_{reg['worker_id']}_")
    assert reg["heartbeat_interval_s"] == 2
    assert reg["ray"] is None  # this coordinator runs without a head
    w = coordinator.admin("GET", f"/api/admin/workers/{reg['worker_id']}").json()
    assert w["status"] == "joining" and w["capabilities"]["cpu_cores"] == 2


def test_gpu_box_goes_to_gpu_tier_and_seed_strings_work(coordinator: Coordinator) -> None:
    assert coordinator.join(H200)["tier"] == "gpu"
    seed = {
        "gpu_memory": "24GB",
        "gpu_type": "NVIDIA RTX 4090",
        "cpu_cores": 16,
        "ram": "64GB",
        "storage": "1TB",
    }
    assert coordinator.join(seed)["tier"] == "gpu"


def test_tier_follows_unmet_demand(coordinator: Coordinator) -> None:
    from admission.models import TierDemand

    with coordinator.state.sessions() as s, s.begin():
        s.add(TierDemand(tier="data", pending=3))
    assert coordinator.join(H200)["tier"] == "data"
    stats = coordinator.admin("GET", "/api/admin/stats").json()
    assert stats["tiers"]["data"]["demand"] == 3


def test_invite_tier_pin(coordinator: Coordinator) -> None:
    assert coordinator.join(tier="data")["tier"] == "data"
    inv = coordinator.invite(tier="gpu")
    r = coordinator.register(inv["token"])
    assert r.status_code == 422
    code, msg = error(r)
    assert code == "tier_not_qualified" and "no GPU found" in msg
    # the refusal did not spend the token: the right hardware still joins with it
    assert coordinator.register(inv["token"], H200).status_code == 201


def test_below_minimum_hardware_is_refused_with_minimums_and_keeps_token(coordinator: Coordinator) -> None:
    inv = coordinator.invite()
    r = coordinator.register(inv["token"], TINY)
    assert r.status_code == 422
    code, msg = error(r)
    assert code == "hardware_below_minimum"
    assert "at least 2 GB of RAM and 20 GB of free disk" in msg and "1024 MiB RAM" in msg
    assert coordinator.admin("GET", "/api/invites").json()[0]["uses_left"] == 1
    audit = coordinator.admin("GET", "/api/admin/audit", params={"action": "worker.register.refused"}).json()
    assert audit and audit[0]["detail"]["code"] == "hardware_below_minimum"


def test_used_token_refused(coordinator: Coordinator) -> None:
    inv = coordinator.invite()
    assert coordinator.register(inv["token"]).status_code == 201
    r = coordinator.register(inv["token"])
    assert r.status_code == 401 and error(r)[0] == "token_used"
    assert "new invite" in error(r)[1]


def test_multi_use_invite(coordinator: Coordinator) -> None:
    inv = coordinator.invite(uses=2)
    assert coordinator.register(inv["token"]).status_code == 201
    assert coordinator.register(inv["token"]).status_code == 201
    assert error(coordinator.register(inv["token"]))[0] == "token_used"


def test_expired_token_refused(coordinator: Coordinator) -> None:
    inv = coordinator.invite(ttl_s=60)
    with coordinator.state.sessions() as s, s.begin():
        s.execute(
            update(Invite)
            .where(Invite.id == inv["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    r = coordinator.register(inv["token"])
    assert r.status_code == 401 and error(r)[0] == "token_expired"
    assert "expired at" in error(r)[1]


def test_revoked_invite_refused(coordinator: Coordinator) -> None:
    inv = coordinator.invite()
    assert coordinator.admin("POST", f"/api/invites/{inv['id']}/revoke").json()["status"] == "revoked"
    r = coordinator.register(inv["token"])
    assert r.status_code == 401 and error(r)[0] == "token_revoked"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_credentials"),
        ("Bearer nonsense", "malformed_token"),
        ("Bearer " + credentials.mint(credentials.Kind.NODE).token, "malformed_token"),
        ("Bearer " + credentials.mint(credentials.Kind.JOIN).token, "invalid_join_token"),
    ],
)
def test_bad_join_tokens(coordinator: Coordinator, header: str | None, code: str) -> None:
    headers = {"Authorization": header} if header else {}
    r = coordinator.http.post(
        "/api/worker/register", json={"name": "x", "capabilities": CPU_BOX}, headers=headers
    )
    assert r.status_code == 401 and error(r)[0] == code
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_forged_secret_for_real_invite_id(coordinator: Coordinator) -> None:
    inv = coordinator.invite()
    forged = f"rma_join_{inv['id']}_" + "0" * 64
    assert error(coordinator.register(forged))[0] == "invalid_join_token"
    assert coordinator.register(inv["token"]).status_code == 201


def test_concurrent_redemptions_of_single_use_token(coordinator: Coordinator) -> None:
    """50 donors redeem one single-use token at once: exactly one gets in, on SQLite and on PostgreSQL."""
    inv = coordinator.invite()
    n = 50
    barrier = threading.Barrier(n)
    results: list[int] = []
    lock = threading.Lock()

    def redeem(i: int) -> None:
        with httpx.Client(base_url=coordinator.url, timeout=60) as http:
            barrier.wait()
            r = http.post(
                "/api/worker/register",
                json={"name": f"d{i}", "capabilities": CPU_BOX},
                headers={"Authorization": f"Bearer {inv['token']}"},
            )
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=redeem, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [201] + [401] * (n - 1)
    with coordinator.state.sessions() as s:
        assert len(s.scalars(select(Worker).where(Worker.invite_id == inv["id"])).all()) == 1
        assert s.get(Invite, inv["id"]).uses_left == 0  # type: ignore[union-attr]


def test_heartbeat_status_and_actions(coordinator: Coordinator) -> None:
    reg = coordinator.join()
    node = {"Authorization": f"Bearer {reg['node_token']}"}
    r = coordinator.http.post(
        "/api/worker/heartbeat",
        headers=node,
        json={"status": "healthy", "current_load": 0.3, "available_memory_mb": 12000, "ray_node_id": "ab12"},
    )
    assert r.status_code == 200 and r.json() == {"action": "none", "cluster": ""}
    w = coordinator.admin("GET", f"/api/admin/workers/{reg['worker_id']}").json()
    assert w["status"] == "healthy" and w["current_load"] == 0.3 and w["available_memory_mb"] == 12000

    # written through to the database by the flusher
    def flushed() -> bool:
        with coordinator.state.sessions() as s:
            row = s.get(Worker, reg["worker_id"])
            return row is not None and row.last_heartbeat_at is not None and row.ray_node_id == "ab12"

    wait_for(flushed, timeout=10, what="the heartbeat flush")

    assert coordinator.admin("POST", f"/api/admin/workers/{reg['worker_id']}/drain").status_code == 200
    assert coordinator.http.post("/api/worker/heartbeat", headers=node, json={}).json()["action"] == "drain"
    coordinator.admin("POST", f"/api/admin/workers/{reg['worker_id']}/resume")
    assert coordinator.http.post("/api/worker/heartbeat", headers=node, json={}).json()["action"] == "none"


def test_seed_style_heartbeat(coordinator: Coordinator) -> None:
    reg = coordinator.join()
    r = coordinator.http.post(
        "/api/worker/heartbeat",
        headers={"Authorization": f"Bearer {reg['node_token']}"},
        json={
            "worker_id": reg["worker_id"],
            "status": "healthy",
            "current_load": 0.3,
            "available_memory_mb": "12GB",
        },
    )
    assert r.status_code == 200


def test_missed_heartbeats_go_warning_then_offline(coordinator: Coordinator) -> None:
    reg = coordinator.join()

    def status() -> str:
        return coordinator.admin("GET", f"/api/admin/workers/{reg['worker_id']}").json()["status"]  # type: ignore[no-any-return]

    def beat_then_healthy() -> bool:  # a beat and the read within one interval (a loaded box may take longer)
        r = coordinator.http.post(
            "/api/worker/heartbeat", headers={"Authorization": f"Bearer {reg['node_token']}"}, json={}
        )
        return r.status_code == 200 and status() == "healthy"

    wait_for(beat_then_healthy, timeout=30, what="healthy right after a heartbeat")
    wait_for(
        lambda: status() == "warning", timeout=10, what="warning after a missed heartbeat (interval 2 s)"
    )
    wait_for(lambda: status() == "offline", timeout=10, what="offline after 2.5 intervals")


def test_unregister(coordinator: Coordinator) -> None:
    reg = coordinator.join()
    node = {"Authorization": f"Bearer {reg['node_token']}"}
    assert coordinator.http.delete("/api/worker/unregister", headers=node).status_code == 204
    r = coordinator.http.post("/api/worker/heartbeat", headers=node, json={})
    assert r.status_code == 401 and error(r)[0] == "worker_revoked"
    assert coordinator.admin("GET", f"/api/admin/workers/{reg['worker_id']}").json()["status"] == "left"


def test_revoke_kills_node_token_at_once(coordinator: Coordinator) -> None:
    reg = coordinator.join()
    node = {"Authorization": f"Bearer {reg['node_token']}"}
    assert coordinator.http.post("/api/worker/heartbeat", headers=node, json={}).status_code == 200
    r = coordinator.admin("POST", f"/api/admin/workers/{reg['worker_id']}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = coordinator.http.post("/api/worker/heartbeat", headers=node, json={})
    assert r.status_code == 401 and error(r)[0] == "worker_revoked"
    assert coordinator.http.delete("/api/worker/unregister", headers=node).status_code == 401
    actions = [e["action"] for e in coordinator.admin("GET", "/api/admin/audit").json()]
    assert {"invite.create", "worker.register", "worker.revoke"} <= set(actions)


def test_revoked_token_survives_coordinator_restart(coordinator: Coordinator, db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Revocation lives in the database, not only in the process's cache."""
    from admission.main import build_state, create_app
    from tests.integration.conftest import make_settings
    from tests.support import ServerThread

    reg = coordinator.join()
    coordinator.admin("POST", f"/api/admin/workers/{reg['worker_id']}/revoke")
    state = build_state(make_settings(db_url, tmp_path / "data"))
    with ServerThread(create_app(state=state)) as other:
        r = httpx.post(
            other.url + "/api/worker/heartbeat",
            json={},
            headers={"Authorization": f"Bearer {reg['node_token']}"},
        )
        assert r.status_code == 401 and error(r)[0] == "worker_revoked"
    state.engine.dispose()


def test_stats_and_health(coordinator: Coordinator) -> None:
    a = coordinator.join()
    coordinator.join(H200)
    coordinator.http.post(
        "/api/worker/heartbeat", headers={"Authorization": f"Bearer {a['node_token']}"}, json={}
    )
    stats = coordinator.admin("GET", "/api/admin/stats").json()
    assert stats["total_workers"] == 2 and stats["online_workers"] == 1
    assert stats["tiers"]["service"]["online"] == 1
    assert stats["tiers"]["service"]["capacity"]["cpu_cores"] == 2
    assert stats["tiers"]["gpu"]["workers"] == {"joining": 1}
    health = coordinator.admin("GET", "/api/admin/health").json()
    assert health == {
        "status": "ok",
        "database": "ok",
        "ray_configured": False,
        "workers_online": 1,
        "workers_total": 2,
    }
    assert coordinator.http.get("/healthz").json() == {"status": "ok"}
    metrics = coordinator.http.get("/metrics").text
    assert "rma_heartbeats_total 1.0" in metrics and 'rma_registrations_total{tier="gpu"} 1.0' in metrics


def test_workers_filter(coordinator: Coordinator) -> None:
    coordinator.join()
    coordinator.join(H200)
    assert [
        w["tier"] for w in coordinator.admin("GET", "/api/admin/workers", params={"tier": "gpu"}).json()
    ] == ["gpu"]
    assert coordinator.admin("GET", "/api/admin/workers", params={"tier": "nope"}).status_code == 422


def test_client_keys_and_keyring(coordinator: Coordinator) -> None:
    created = coordinator.admin("POST", "/api/admin/clients", json={"name": "frontend"})
    assert created.status_code == 201
    key = created.json()
    assert key["key"].startswith(f"rma_client_{key['id']}_")
    ring = coordinator.admin("GET", "/api/clients/keyring").json()
    assert [e["id"] for e in ring["keys"]] == [key["id"]]
    assert key["key"].split("_")[3] not in str(ring)
    # a node may read the keyring too (the Serve side runs on nodes); nobody else
    reg = coordinator.join()
    assert (
        coordinator.http.get(
            "/api/clients/keyring", headers={"Authorization": f"Bearer {reg['node_token']}"}
        ).status_code
        == 200
    )
    assert coordinator.http.get("/api/clients/keyring").status_code == 401
    coordinator.admin("POST", f"/api/admin/clients/{key['id']}/revoke")
    assert coordinator.admin("GET", "/api/clients/keyring").json()["keys"] == []
    assert coordinator.admin("GET", "/api/admin/clients").json()[0]["revoked_at"] is not None


def test_admin_keys(coordinator: Coordinator) -> None:
    first_id = coordinator.admin_key.split("_")[2]
    second = coordinator.admin("POST", "/api/admin/keys", json={"name": "ops"}).json()
    r = coordinator.admin("POST", f"/api/admin/keys/{second['id']}/revoke")
    assert r.status_code == 200
    r = coordinator.http.get("/api/admin/workers", headers={"Authorization": f"Bearer {second['key']}"})
    assert r.status_code == 401
    r = coordinator.admin("POST", f"/api/admin/keys/{first_id}/revoke")
    assert r.status_code == 409 and error(r)[0] == "last_admin_key"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x"},
        {"name": "", "capabilities": CPU_BOX},
        {"name": "x", "capabilities": {"cpu_cores": -1, "ram_mb": 1}},
        {"name": "x", "capabilities": CPU_BOX, "surprise": 1},
        [],
    ],
)
def test_malformed_register_bodies_are_422(coordinator: Coordinator, body: object) -> None:
    inv = coordinator.invite()
    r = coordinator.http.post(
        "/api/worker/register", json=body, headers={"Authorization": f"Bearer {inv['token']}"}
    )
    assert r.status_code == 422 and error(r)[0] == "invalid_request"
    assert coordinator.admin("GET", "/api/invites").json()[0]["uses_left"] == 1


def test_invite_validation(coordinator: Coordinator) -> None:
    for body in ({"ttl_s": 1}, {"uses": 0}, {"tier": "quantum"}, {"ttl_s": 10**9}):
        r = coordinator.admin("POST", "/api/invites", json=body)
        assert r.status_code == 422, body
        assert error(r)[1]


def test_body_limit(coordinator: Coordinator) -> None:
    inv = coordinator.invite()
    r = coordinator.http.post(
        "/api/worker/register",
        content=b"{" + b" " * 100_000 + b"}",
        headers={"Authorization": f"Bearer {inv['token']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and error(r)[0] == "payload_too_large"


def test_audit_rows_only_for_committed_changes(coordinator: Coordinator) -> None:
    inv = coordinator.invite(tier="gpu")
    coordinator.register(inv["token"])  # refused: 422
    with coordinator.state.sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent))]
        assert "worker.register" not in actions and "worker.register.refused" in actions
        assert s.scalars(select(Worker)).all() == []


def test_bad_heartbeat_bodies_are_422_after_auth(coordinator: Coordinator) -> None:
    reg = coordinator.join()
    node = {"Authorization": f"Bearer {reg['node_token']}", "Content-Type": "application/json"}
    for body in (b'{"current_load": -1}', b"not json", b'{"status": "on fire"}', b"[]"):
        r = coordinator.http.post("/api/worker/heartbeat", headers=node, content=body)
        assert r.status_code == 422 and error(r)[0] == "invalid_request", (body, r.text)
    # without a credential the body is never looked at
    r = coordinator.http.post("/api/worker/heartbeat", content=b"not json")
    assert r.status_code == 401


def test_logs_and_the_audit_trail_carry_only_the_kind_and_id(
    coordinator: Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """Every flow that handles a secret (admin, invite, node, client and service credentials, a registry session,
    and secrets guessed wrong), with every log record at DEBUG and every audit row read back: no secret, nor the
    hash stored for it, appears in either; audit actors are `kind:id`. The coordinator logs nothing on these
    paths today: the log half fails the day a line that carries a secret is added."""
    c, http = coordinator, coordinator.http

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    caplog.set_level(logging.DEBUG)  # the root logger: every logger that propagates, the rma tree included
    uvicorn_log = logging.getLogger("uvicorn")  # uvicorn's own tree does not propagate: hear it too
    uvicorn_log.addHandler(caplog.handler)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        caplog.set_level(logging.DEBUG, logger=name)
    try:
        admin = c.admin("POST", "/api/admin/keys", json={"name": "ops"}).json()
        assert c.admin("POST", f"/api/admin/keys/{admin['id']}/revoke").status_code == 200
        inv = c.invite(uses=2)
        reg = c.register(inv["token"]).json()
        node = reg["node_token"]
        assert http.post("/api/worker/heartbeat", headers=bearer(node), json={}).status_code == 200
        c.state.buffer.flush(c.state.sessions)
        r = http.post("/api/worker/rejoin", headers=bearer(node), json={"name": "d", "capabilities": CPU_BOX})
        assert r.status_code == 200, r.text
        aborted = c.register(inv["token"]).json()["node_token"]
        assert http.post("/api/worker/abort", headers=bearer(aborted)).json() == {"refunded": True}
        client = c.admin("POST", "/api/admin/clients", json={"name": "frontend"}).json()
        assert c.admin("POST", f"/api/admin/clients/{client['id']}/revoke").status_code == 200
        service = c.admin("POST", "/api/admin/service-keys", json={"name": "head"}).json()
        assert http.get("/api/clients/keyring", headers=bearer(service["key"])).status_code == 200
        # secrets guessed wrong for real ids: refused, and not logged either
        forged = [
            f"rma_join_{inv['id']}_{'1' * 64}",
            f"rma_admin_{admin['id']}_{'2' * 64}",
            f"rma_node_{reg['worker_id']}_{'3' * 64}",
        ]
        assert c.register(forged[0]).status_code == 401
        assert http.get("/api/admin/workers", headers=bearer(forged[1])).status_code == 401
        assert http.post("/api/worker/heartbeat", headers=bearer(forged[2]), json={}).status_code == 401
        login = http.post("/registry/login", data={"admin_key": c.admin_key})
        assert login.status_code == 303, login.text
        session = login.cookies["rma_session"]
        assert http.get("/registry").status_code == 200  # the client's jar sends the cookie
        assert http.post("/registry/logout").status_code == 303
        http.cookies.clear()
        assert c.admin("POST", f"/api/admin/workers/{reg['worker_id']}/revoke").status_code == 200
        assert http.delete("/api/worker/unregister", headers=bearer(node)).status_code == 401
        api_audit = c.admin("GET", "/api/admin/audit", params={"limit": 1000}).json()
    finally:
        uvicorn_log.removeHandler(caplog.handler)

    with c.state.sessions() as s:
        rows = [
            {"actor": e.actor, "action": e.action, "subject": e.subject, "ip": e.ip, "detail": e.detail}
            for e in s.scalars(select(AuditEvent))
        ]
    actions = {row["action"] for row in rows}
    assert {
        "admin_key.create",
        "admin_key.revoke",
        "invite.create",
        "worker.register",
        "worker.register.aborted",
        "client_key.create",
        "client_key.revoke",
        "service_key.create",
        "worker.revoke",
    } <= actions, actions
    assert all(re.fullmatch(r"system|[a-z]+:[0-9a-f]{12}", row["actor"]) for row in rows), rows
    tokens = [c.admin_key, admin["key"], inv["token"], node, aborted, client["key"], service["key"], *forged]
    parts = [credentials.parse(t, credentials.Kind(t.split("_")[1])) for t in tokens]
    forbidden = {p.secret for p in parts} | {credentials.hash_secret(p.secret) for p in parts}
    forbidden |= {session, c.state.settings.resolved_secret_key()}
    # The test's own HTTP client logs response headers at DEBUG, the session's Set-Cookie included: that is
    # this test holding the cookie it was given, not the coordinator logging it.
    mine = threading.get_ident()
    served = [
        r for r in caplog.records if not (r.thread == mine and r.name.startswith(("httpx", "httpcore")))
    ]
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in served)
    haystacks = {"logs": logs, "audit rows": json.dumps(rows), "audit API": json.dumps(api_audit)}
    for where, text in haystacks.items():
        leaked = [value[:12] + "..." for value in forbidden if value in text]
        assert not leaked, f"{where} carry secrets or their hashes: {leaked}"
