"""Two revokes of the pool's last two admin keys at once, on PostgreSQL (no Ray): one wins, the other is refused
with `last_admin_key`, and one admin key is left. Under READ COMMITTED each transaction used to count two active
keys and revoke its own, leaving none (nobody could administer the pool again). SQLite needs no test of this:
its writers run one at a time from BEGIN IMMEDIATE (admission/db.py). ~1 s on the session's PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from admission import db
from admission.errors import ApiError
from admission.main import build_state, prepare_database
from admission.models import AdminKey
from admission.services import keys
from tests.integration.conftest import make_settings
from tests.support import Postgres, wait_for

pytestmark = pytest.mark.postgres


def test_two_revokes_of_the_last_two_admin_keys_at_once_leave_one(postgres: Postgres, tmp_path: Path) -> None:
    state = build_state(make_settings(postgres.create_database(), tmp_path / "data"))
    assert prepare_database(state)  # the first admin key
    with db.session_scope(state.sessions) as s:
        keys.create(s, AdminKey, "second", "system", "127.0.0.1")
        first, second = (k.id for k in keys.list_all(s, AdminKey))
    # A revokes the first key and has not committed yet; B revokes the second meanwhile
    a = state.sessions()
    keys.revoke(a, AdminKey, first, "admin:a", "127.0.0.1")
    outcome: dict[str, str] = {}

    def revoke_second() -> None:
        try:
            with db.session_scope(state.sessions) as b:
                keys.revoke(b, AdminKey, second, "admin:b", "127.0.0.1")
            outcome["b"] = "revoked"
        except ApiError as exc:
            outcome["b"] = exc.code

    other = threading.Thread(target=revoke_second, daemon=True)
    other.start()

    def waiting_on_a_lock() -> bool:
        with state.engine.connect() as c:
            return bool(
                c.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            )

    # B either waits for A's locks (the fix) or has already revoked the second key (the race)
    wait_for(
        lambda: "b" in outcome or waiting_on_a_lock(), timeout=30, what="the second revoke to wait or end"
    )
    a.commit()
    a.close()
    other.join(30)
    assert outcome == {"b": "last_admin_key"}
    with db.session_scope(state.sessions) as s:
        assert keys.active_admin_keys(s) == 1
        left = [k.id for k in keys.list_all(s, AdminKey) if k.revoked_at is None]
    assert left == [second]
    state.engine.dispose()
