"""Per-IP rate limits, and the schema migrations, on the real app."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from admission import migrate
from admission.db import make_engine
from admission.main import create_app
from admission.models import Base
from rma_ray import credentials
from tests.integration.conftest import CPU_BOX, make_settings


def test_failed_auth_is_rate_limited_per_ip(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'db'}", tmp_path, auth_failure_rate="5/minute"))
    with TestClient(app) as client:
        bad = {"Authorization": "Bearer " + credentials.mint(credentials.Kind.ADMIN).token}
        codes = [client.get("/api/admin/workers", headers=bad).status_code for _ in range(7)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
        r = client.get("/api/admin/workers", headers=bad)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.json()["error"]["code"] == "rate_limited"
        # node tokens from the same IP are refused too, before their credential is looked at
        node = {"Authorization": "Bearer " + credentials.mint(credentials.Kind.NODE).token}
        assert client.post("/api/worker/heartbeat", headers=node, json={}).status_code == 429


def test_register_is_rate_limited_per_ip(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'db'}", tmp_path, register_rate="3/minute"))
    with TestClient(app) as client:
        token = "Bearer " + credentials.mint(credentials.Kind.JOIN).token
        codes = [
            client.post(
                "/api/worker/register",
                json={"name": "x", "capabilities": CPU_BOX},
                headers={"Authorization": token},
            ).status_code
            for _ in range(4)
        ]
        assert codes == [401, 401, 401, 429]


def test_migrations_match_models_and_round_trip(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"
    assert {"workers", "invites", "admin_keys", "client_keys", "audit_events", "tier_demand"} <= set(
        inspect(engine).get_table_names()
    )
    migrate.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(engine)
    assert "workers" in inspect(engine).get_table_names()
    engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


@pytest.mark.parametrize("url", ["postgresql://rma@127.0.0.1:1/x"])
def test_postgres_url_uses_psycopg3(url: str) -> None:
    assert make_engine(url).dialect.driver == "psycopg"
