"""Rejoin with the node credential, and the transactional join (refused unspent, aborted with a refund), on
SQLite and PostgreSQL against a real coordinator (the `coordinator` fixture, ~0.3 s / ~1 s each)."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import update

from admission.models import Worker
from tests.integration.conftest import CPU_BOX, Coordinator

SMALL_BOX = {**CPU_BOX, "ram_mb": 4096, "cpu_cores": 1, "disk_free_gb": 40.0}  # data tier only


def node_post(c: Coordinator, path: str, token: str, json: Any = None) -> httpx.Response:
    return c.http.post(path, json=json, headers={"Authorization": f"Bearer {token}"})


def rejoin(c: Coordinator, token: str, caps: dict[str, Any] | None = None) -> httpx.Response:
    return node_post(c, "/api/worker/rejoin", token, {"name": "donor", "capabilities": caps or CPU_BOX})


def uses_left(c: Coordinator, invite_id: str) -> int:
    r = c.admin("GET", "/api/invites")
    return next(i["uses_left"] for i in r.json() if i["id"] == invite_id)  # type: ignore[no-any-return]


def beat(c: Coordinator, token: str) -> None:
    assert node_post(c, "/api/worker/heartbeat", token, {"status": "healthy"}).status_code == 200
    c.state.buffer.flush(c.state.sessions)


def test_rejoin_keeps_the_id_spends_nothing_and_rechecks_the_tier(coordinator: Coordinator) -> None:
    invite = coordinator.invite(uses=1)
    reg = coordinator.register(invite["token"]).json()
    beat(coordinator, reg["node_token"])
    r = rejoin(coordinator, reg["node_token"], SMALL_BOX)  # the machine came back with less memory
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["worker_id"] == reg["worker_id"] and "node_token" not in body
    assert body["tier"] == "data" and body["labels"]["rma.io/tier"] == "data"
    assert uses_left(coordinator, invite["id"]) == 0
    node = {"Authorization": f"Bearer {reg['node_token']}"}
    me = coordinator.http.get("/api/worker/me", headers=node).json()
    assert me["capabilities"]["ram_mb"] == 4096 and me["tier"] == "data"
    # the spent join token itself still admits no one
    assert coordinator.register(invite["token"]).json()["error"]["code"] == "token_used"


def test_revoked_left_quarantined_and_unknown_donors_are_refused_with_the_reason(
    coordinator: Coordinator,
) -> None:
    revoked, left, quarantined = (coordinator.join() for _ in range(3))
    assert coordinator.admin("POST", f"/api/admin/workers/{revoked['worker_id']}/revoke").status_code == 200
    left_node = {"Authorization": f"Bearer {left['node_token']}"}
    assert coordinator.http.delete("/api/worker/unregister", headers=left_node).status_code == 204
    with coordinator.state.sessions() as s, s.begin():
        s.execute(
            update(Worker)
            .where(Worker.id == quarantined["worker_id"])
            .values(quarantine_reason="labels differ from the registry")
        )
    for reg, code, words in (
        (revoked, "worker_revoked", "revoked"),
        (left, "worker_left", "new invite"),
        (quarantined, "quarantined", "labels differ"),
    ):
        r = rejoin(coordinator, reg["node_token"])
        assert r.status_code == 403 and r.json()["error"]["code"] == code, r.text
        assert words in r.json()["error"]["message"]
    forged = revoked["node_token"][:-4] + "AAAA"
    assert rejoin(coordinator, forged).status_code == 401
    assert rejoin(coordinator, "rma_join_x_y").json()["error"]["code"] == "malformed_token"


def test_abort_refunds_a_never_started_registration_once(coordinator: Coordinator) -> None:
    invite = coordinator.invite(uses=1)
    first = coordinator.register(invite["token"]).json()
    r = node_post(coordinator, "/api/worker/abort", first["node_token"])
    assert r.status_code == 200 and r.json() == {"refunded": True}, r.text
    assert uses_left(coordinator, invite["id"]) == 1
    # a replay is refused: the registration is over, and the use was given back once only
    assert node_post(coordinator, "/api/worker/abort", first["node_token"]).status_code == 401
    assert uses_left(coordinator, invite["id"]) == 1
    second = coordinator.register(invite["token"])
    assert second.status_code == 201, second.text
    assert coordinator.register(invite["token"]).json()["error"]["code"] == "token_used"
    # a registration that ever ran ends without a refund
    beat(coordinator, second.json()["node_token"])
    r = node_post(coordinator, "/api/worker/abort", second.json()["node_token"])
    assert r.json() == {"refunded": False}
    assert uses_left(coordinator, invite["id"]) == 0
    statuses = {w["id"]: w["status"] for w in coordinator.admin("GET", "/api/admin/workers").json()}
    assert statuses[first["worker_id"]] == statuses[second.json()["worker_id"]] == "left"


def test_a_donor_that_cannot_be_placed_is_refused_before_its_invite_is_spent(
    coordinator: Coordinator,
) -> None:
    invite = coordinator.invite(uses=1)
    reg = coordinator.join()
    settings = coordinator.state.settings
    try:
        settings.admit_without_ray = False
        r = coordinator.register(invite["token"])
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_ray_head", r.text
        assert "rma up" in r.json()["error"]["message"]
        settings.ray_address = "127.0.0.1:1"  # nothing listens there
        r = coordinator.register(invite["token"])
        assert r.status_code == 409 and r.json()["error"]["code"] == "ray_head_unreachable", r.text
        assert rejoin(coordinator, reg["node_token"]).json()["error"]["code"] == "ray_head_unreachable"
        assert uses_left(coordinator, invite["id"]) == 1
    finally:
        settings.admit_without_ray, settings.ray_address = True, None
    assert coordinator.register(invite["token"]).status_code == 201
