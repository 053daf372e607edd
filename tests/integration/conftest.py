"""A real coordinator on a real port, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from admission.main import build_state, create_app, prepare_database
from admission.state import AppState
from rma_ray.settings import Settings
from tests.support import ServerThread

CPU_BOX = {
    "cpu_cores": 2,
    "ram_mb": 24105,
    "disk_free_gb": 70.0,
    "os": "Linux",
    "hostname": "donor",
    "gpus": [],
}


@dataclass
class Coordinator:
    url: str
    admin_key: str
    state: AppState
    http: httpx.Client

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, path, headers={"Authorization": f"Bearer {self.admin_key}"}, **kw)

    def invite(self, **fields: Any) -> dict[str, Any]:
        r = self.admin("POST", "/api/invites", json=fields)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def register(self, token: str, caps: dict[str, Any] | None = None, name: str = "donor") -> httpx.Response:
        return self.http.post(
            "/api/worker/register",
            json={"name": name, "capabilities": caps or CPU_BOX},
            headers={"Authorization": f"Bearer {token}"},
        )

    def join(self, caps: dict[str, Any] | None = None, **invite: Any) -> dict[str, Any]:
        r = self.register(self.invite(**invite)["token"], caps)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]


def make_settings(db_url: str, data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "database_url": db_url,
        "data_dir": data_dir,
        "register_rate": "10000/minute",
        "auth_failure_rate": "10000/minute",
        "heartbeat_interval_s": 2,
        "heartbeat_flush_s": 0.2,
        # these coordinators run without a Ray head: registrations are what they test
        "admit_without_ray": True,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def coordinator(db_url: str, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator served by uvicorn in this process on a free port (~0.3 s on SQLite, ~1 s on Postgres)."""
    state = build_state(make_settings(db_url, tmp_path / "data"))
    admin_key = prepare_database(state)
    assert admin_key
    with (
        ServerThread(create_app(state=state)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield Coordinator(server.url, admin_key, state, http)
    state.engine.dispose()
