"""Review findings on the real coordinator, on SQLite and PostgreSQL (no Ray): a quarantined donor's node
credential keeps only its own state (heartbeat, status, leave), and a NUL character anywhere a donor or an
admin can put one (a body's string, a path, a query string) is a 4xx that says so, never a 500 (PostgreSQL's
text cannot hold one), and writes nothing. A coordinator served in this process with one edge whose "GCS" is a
listening socket (~0.3 s on SQLite, ~1 s on PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from admission.models import AuditEvent, Invite, SpotCheck, Store, Worker
from admission.services import batch_queue
from tests.integration.conftest import CPU_BOX, Coordinator, make_settings, one_edge, serve

STORE_REPORT = {
    "runtime": "process",
    "status": "ready",
    "node_id": "n" * 56,
    "node_ip": "10.0.0.7",
    "port": 5440,
    "size_bytes": 41_000_000,
}


@pytest.fixture
def pool(db_url: str, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator with one edge ("edge"), so that the edge routes and spot-checks exist."""
    try:
        with (
            one_edge(tmp_path) as edge,
            serve(make_settings(db_url, tmp_path / "data", edges=[edge], spot_check_min_checks=5)) as c,
        ):
            yield c
    finally:
        batch_queue._replicas.clear()


def _verdict(n: int) -> dict[str, Any]:
    return {
        "edge": "edge",
        "app": "llm",
        "kind": "llm",
        "path": "/v1/chat/completions",
        "passed": False,
        "score": -6.5,
        "threshold": -2.0,
        "request_sha256": hashlib.sha256(str(n).encode()).hexdigest(),
        "sample": {"request": f"prompt {n}", "edge": "garbage", "core": "an answer"},
    }


def _service_routes(n: int) -> dict[str, tuple[str, str, dict[str, Any] | None]]:
    """Every node-token route that hands out or takes in more than the donor's own state (n: a fresh body)."""
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    return {
        "keyring": ("GET", "/api/clients/keyring", None),
        "usage": (
            "POST",
            "/api/clients/usage",
            {"replica": f"gw#{n}", "day": day, "shared": True, "usage": {}},
        ),
        "batch-queue": (
            "POST",
            "/api/service/batch-queue",
            {"replica": f"b#{n}", "waiting": 1, "running": 0, "batches": 1, "finished_10min": 0},
        ),
        "edge-routes": ("POST", "/api/service/edge-routes", None),
        "spot-checks": ("POST", "/api/service/spot-checks", _verdict(n)),
        "store": ("PUT", "/api/stores/redis", {**STORE_REPORT, "size_bytes": n}),
    }


def test_a_quarantined_donors_credential_keeps_only_its_own_state(pool: Coordinator) -> None:
    reg = pool.join(tier="data", trusted=True)
    wid, auth = reg["worker_id"], {"Authorization": f"Bearer {reg['node_token']}"}

    def call(method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        return pool.http.request(method, path, json=body, headers=auth)

    accepted = {name: call(*route).status_code for name, route in _service_routes(1).items()}
    assert accepted == {
        "keyring": 200,
        "usage": 204,
        "batch-queue": 204,
        "edge-routes": 200,
        "spot-checks": 204,
        "store": 204,
    }
    with pool.state.sessions() as s, s.begin():  # as the reconciler does for an impostor's node
        w = s.get(Worker, wid)
        assert w is not None
        w.quarantine_reason, w.action = "two nodes claim this donor", "drain"

    with pool.state.sessions() as s:
        checks_before = s.scalar(select(func.count()).select_from(SpotCheck))
    for name, route in _service_routes(2).items():
        r = call(*route)
        assert r.status_code == 403, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == "quarantined" and "two nodes claim this donor" in error["message"], (
            name,
            error,
        )
    with pool.state.sessions() as s:
        store = s.get(Store, "redis")
        assert store is not None and store.size_bytes == 1  # the refused report changed nothing
        assert s.scalar(select(func.count()).select_from(SpotCheck)) == checks_before
    assert "gw#2" not in pool.admin("GET", "/api/admin/usage").text
    # the batch-queue table is the process's (other in-process tests' reports may be listed): the refused one is not
    replicas = [r["replica"] for r in pool.admin("GET", "/api/admin/batch-queue").json()["replicas"]]
    assert "b#1" in replicas and "b#2" not in replicas, replicas
    # what a quarantined donor keeps: it learns its state (drain) on its heartbeat and `rma status`, and may leave
    assert call("GET", "/api/worker/ray", None).status_code == 403  # as before: no cluster token
    beat = call("POST", "/api/worker/heartbeat", {"status": "healthy", "current_load": 0.1})
    assert beat.status_code == 200, beat.text  # (its action comes from the reconciler's cache, not set here)
    me = call("GET", "/api/worker/me", None)
    assert me.status_code == 200 and me.json()["quarantine_reason"] == "two nodes claim this donor"
    assert call("GET", "/api/worker/contribution", None).status_code == 200
    assert pool.http.delete("/api/worker/unregister", headers=auth).status_code == 204


def _counts(coordinator: Coordinator) -> tuple[int, int, int]:
    with coordinator.state.sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(Worker)) or 0,
            s.scalar(select(func.sum(Invite.uses_left))) or 0,
            s.scalar(select(func.count()).select_from(AuditEvent)) or 0,
        )


def test_a_nul_anywhere_is_a_4xx_that_says_so_and_writes_nothing(coordinator: Coordinator) -> None:
    reg = coordinator.join()
    node = {"Authorization": f"Bearer {reg['node_token']}"}
    token = coordinator.invite()["token"]
    before = _counts(coordinator)
    refusals = [
        coordinator.register(token, name="donor\x00"),
        coordinator.register(token, caps={**CPU_BOX, "os": "Linux\x00"}),
        coordinator.http.post(
            "/api/worker/rejoin",
            headers=node,
            json={"name": "donor", "capabilities": {**CPU_BOX, "hostname": "box\x00evil"}},
        ),
        coordinator.admin("POST", "/api/admin/clients", json={"name": "acme", "donor_id": "\x00"}),
        coordinator.admin("POST", "/api/invites", json={"note": "a\x00b"}),
        coordinator.admin("PUT", "/api/stores/redis", json={**STORE_REPORT, "error": "x\x00"}),
    ]
    for r in refusals:
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and "NUL" in error["message"], error
    for path in (
        f"/api/admin/workers/{reg['worker_id']}%00",
        "/api/admin/workers/%00",
        "/api/admin/audit?action=%00",
        "/api/admin/clients/%00/revoke",
        "/api/admin/metrics?step_s=60&cluster=%00",
    ):
        method = "POST" if path.endswith("revoke") else "GET"
        r = coordinator.admin(method, path)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and "NUL" in error["message"], (path, error)
    assert _counts(coordinator) == before
    me = coordinator.admin("GET", f"/api/admin/workers/{reg['worker_id']}").json()
    assert me["name"] == "donor" and me["capabilities"]["hostname"] == "donor"
    # a NUL-free body still works (the refusal is for the NUL, not the field)
    assert coordinator.register(token, name="donor two").status_code == 201
