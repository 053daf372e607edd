"""A review finding on POST /api/worker/rejoin, on the real app (SQLite and PostgreSQL): a revoked donor replaying
its refused rejoin spends its address's registration budget (429 past it) and gets at most one audit row a
minute per address, as refused registrations do. Requests go through Starlette's TestClient with a chosen peer
address (no server, no sleeping; the limiter's clock is the wall clock, so the burst stays inside one minute)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from admission.main import build_state, create_app, prepare_database
from admission.models import AuditEvent
from tests.integration.conftest import CPU_BOX, make_settings


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_refused_rejoins_are_rate_limited_and_audited_once_a_minute(db_url: str, tmp_path: Path) -> None:
    register_budget = 20
    state = build_state(make_settings(db_url, tmp_path / "data", register_rate=f"{register_budget}/minute"))
    admin_key = prepare_database(state)
    app = create_app(state=state)
    assert admin_key
    admin = TestClient(app, client=("192.0.2.1", 1))
    workers = []
    for ip in ("198.51.100.2", "198.51.100.3"):
        token = admin.post("/api/invites", json={}, headers=_bearer(admin_key)).json()["token"]
        reg = TestClient(app, client=(ip, 1)).post(
            "/api/worker/register", json={"name": "d", "capabilities": CPU_BOX}, headers=_bearer(token)
        )
        assert reg.status_code == 201, reg.text
        workers.append(reg.json())
    gone, kept = workers
    revoke = admin.post(f"/api/admin/workers/{gone['worker_id']}/revoke", headers=_bearer(admin_key))
    assert revoke.status_code == 200, revoke.text

    spammer = TestClient(app, client=("198.51.100.2", 1))  # registering spent one of this address's budget
    body = {"name": "x", "capabilities": CPU_BOX}
    codes = [
        spammer.post("/api/worker/rejoin", json=body, headers=_bearer(gone["node_token"])).status_code
        for _ in range(register_budget + 10)
    ]
    assert codes == [403] * (register_budget - 1) + [429] * 11
    with state.sessions() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "worker.rejoin.refused")).all()
        assert [(r.ip, r.subject, r.detail["code"], r.detail["count"]) for r in rows] == [
            ("198.51.100.2", gone["worker_id"], "worker_revoked", 1)
        ]
        rejoins = select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "worker.rejoin")
        assert s.scalar(rejoins) == 0

    # a live donor from its own address rejoins as before
    r = TestClient(app, client=("198.51.100.3", 1)).post(
        "/api/worker/rejoin", json=body, headers=_bearer(kept["node_token"])
    )
    assert r.status_code == 200, r.text
    assert r.json()["worker_id"] == kept["worker_id"]
    state.engine.dispose()
