"""A review finding on the coordinator's per-IP failed-auth budget, on the real app (SQLite and PostgreSQL):
failures sent from the head's own address (an edge donor's tasks run there) cannot lock out the head's service
credential, the operator's admin key or a registry session, while invalid credentials from that address are
still refused without database work. Requests go through Starlette's TestClient with a chosen peer address (no
server, no sleeping)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event

from admission.main import build_state, create_app, prepare_database
from admission.state import AppState
from rma_ray import credentials
from tests.integration.conftest import make_settings

HEAD = ("192.168.1.10", 40000)  # the head: its Serve replicas and an edge donor's tasks both connect from it
BUDGET = 30  # failed authentications a minute per address


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _start(settings: Any) -> tuple[AppState, str | None, Any]:
    state = build_state(settings)
    admin_key = prepare_database(state)
    return state, admin_key, create_app(state=state)


@contextmanager
def _statements(state: AppState) -> Iterator[list[str]]:
    """The SQL statements sent while the block runs."""
    seen: list[str] = []

    def on_sql(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(state.engine, "before_cursor_execute", on_sql)
    try:
        yield seen
    finally:
        event.remove(state.engine, "before_cursor_execute", on_sql)


def _spend_budget(head: TestClient) -> None:
    """What code running as the edge user on the head can send: bad credentials until its address is refused."""
    bogus = _bearer(credentials.mint(credentials.Kind.ADMIN).token)
    codes = [head.get("/api/admin/workers", headers=bogus).status_code for _ in range(BUDGET + 1)]
    assert codes == [401] * BUDGET + [429]


def test_failures_from_the_heads_address_never_refuse_its_valid_credentials(
    db_url: str, tmp_path: Path
) -> None:
    settings = make_settings(db_url, tmp_path / "data", auth_failure_rate=f"{BUDGET}/minute")
    state, admin_key, app = _start(settings)
    assert admin_key
    head = TestClient(app, client=HEAD)
    service_key = head.post(
        "/api/admin/service-keys", json={"name": "head"}, headers=_bearer(admin_key)
    ).json()
    service = _bearer(service_key["key"])
    admin = _bearer(admin_key)
    assert head.get("/api/clients/keyring", headers=service).status_code == 200
    login = head.post("/registry/login", data={"admin_key": admin_key}, follow_redirects=False)
    assert login.status_code == 303
    cookie = login.cookies["rma_session"]

    _spend_budget(head)
    # the head's own services, the operator's CLI and the operator's browser session still get in
    assert head.get("/api/clients/keyring", headers=service).status_code == 200
    assert head.get("/api/admin/workers", headers=admin).status_code == 200
    browser = TestClient(app, client=HEAD, cookies={"rma_session": cookie})
    assert browser.get("/registry/metrics").status_code == 200

    # invalid ones are still refused, before any database work: wrong secrets for the real ids included
    service_id, admin_id = service_key["id"], admin_key.split("_")[2]
    invalid = [
        ("/api/clients/keyring", _bearer(f"rma_service_{service_id}_" + "0" * 64)),
        ("/api/clients/keyring", _bearer(credentials.mint(credentials.Kind.SERVICE).token)),
        ("/api/admin/workers", _bearer(f"rma_admin_{admin_id}_" + "0" * 64)),
        ("/api/admin/workers", _bearer(credentials.mint(credentials.Kind.ADMIN).token)),
        ("/api/admin/workers", {}),
    ]
    with _statements(state) as sql:
        assert [head.get(path, headers=h).status_code for path, h in invalid] == [429] * len(invalid)
        forged = TestClient(app, client=HEAD, cookies={"rma_session": cookie[:-4] + "AAAA"})
        assert forged.get("/registry/metrics").status_code == 429
    assert sql == []
    # ... and guessing at the real ids evicted nothing: the owners still get in
    assert head.get("/api/clients/keyring", headers=service).status_code == 200
    assert head.get("/api/admin/workers", headers=admin).status_code == 200

    # a revoked service key is refused by the database once, then by the address's budget
    revoked = head.post(f"/api/admin/service-keys/{service_id}/revoke", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert [head.get("/api/clients/keyring", headers=service).status_code for _ in range(2)] == [401, 429]
    state.engine.dispose()


def test_a_restarted_coordinator_lets_live_keys_past_a_spent_budget(db_url: str, tmp_path: Path) -> None:
    """The head's keyring refresh may be the first request a restarted coordinator sees from that key."""
    settings = make_settings(db_url, tmp_path / "data", auth_failure_rate=f"{BUDGET}/minute")
    state, admin_key, app = _start(settings)
    assert admin_key
    first = TestClient(app, client=HEAD)
    service = _bearer(
        first.post("/api/admin/service-keys", json={"name": "head"}, headers=_bearer(admin_key)).json()["key"]
    )
    state.engine.dispose()

    state, minted, app = _start(settings)  # the same database, a fresh process's memory
    assert minted is None
    head = TestClient(app, client=HEAD)
    _spend_budget(head)
    assert head.get("/api/clients/keyring", headers=service).status_code == 200
    assert head.get("/api/admin/workers", headers=_bearer(admin_key)).status_code == 200
    state.engine.dispose()
