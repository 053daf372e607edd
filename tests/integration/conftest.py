"""A real coordinator on a real port, on SQLite and on PostgreSQL."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from admission.main import build_state, create_app, prepare_database
from admission.state import AppState
from rma_ray.edges import EdgeEndpoint
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


@contextmanager
def serve(settings: Settings) -> Iterator[Coordinator]:
    """A coordinator with these settings, served by uvicorn in this process on a free port (~0.3 s on SQLite,
    ~1 s on Postgres)."""
    state = build_state(settings)
    admin_key = prepare_database(state)
    assert admin_key
    try:
        with (
            ServerThread(create_app(state=state)) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            yield Coordinator(server.url, admin_key, state, http)
    finally:
        state.engine.dispose()


@contextmanager
def one_edge(tmp_path: Path) -> Iterator[EdgeEndpoint]:
    """An edge named "edge": a listening socket stands for its GCS, a token file for its token, and nothing
    answers at its dashboard (the edge reports unhealthy, and is still routed to)."""
    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen(8)
        (tmp_path / "edge-token").write_text("edge-token-" + "e" * 40)
        yield EdgeEndpoint(
            name="edge",
            ray_address=f"127.0.0.1:{gcs.getsockname()[1]}",
            dashboard_url="http://127.0.0.1:9",
            serve_url="http://127.0.0.1:9/edge",
            token_file=tmp_path / "edge-token",
        )


@pytest.fixture
def coordinator(db_url: str, tmp_path: Path) -> Iterator[Coordinator]:
    with serve(make_settings(db_url, tmp_path / "data")) as c:
        yield c
