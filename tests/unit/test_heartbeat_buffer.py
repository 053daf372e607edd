"""The coordinator's heartbeat buffer (admission.state.HeartbeatBuffer) on a real SQLite database: a beat is
never out of sight while a flush writes it. Found by CI's light lane running beside the heavy one: a donor's
healthy beat after a pause, read by the admin view while a slowed flush had taken it from the pending map and
not yet committed it, showed the row's old `paused` (tests/integration/test_donor_pause.py)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from admission import migrate
from admission.db import make_engine, make_sessionmaker
from admission.models import Worker
from admission.state import Beat, HeartbeatBuffer
from tests.support import wait_for


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, sessionmaker[Session]]]:
    path = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    sm = make_sessionmaker(engine)
    with sm() as s, s.begin():
        s.add(
            Worker(
                id="donora", name="a-pc", tier="service", capabilities={}, labels={}, node_token_hash="0" * 64
            )
        )
    yield path, sm
    engine.dispose()


def beat(status: str) -> Beat:
    return Beat(datetime.now(UTC), status, 0.1, 1024, None)


def stored_status(path: Path) -> str | None:
    """Read with a plain connection: the coordinator's sessions begin IMMEDIATE, and wait for the write lock."""
    with closing(sqlite3.connect(path)) as c:
        (status,) = c.execute("SELECT heartbeat_status FROM workers WHERE id = 'donora'").fetchone()
    return status  # type: ignore[no-any-return]


def test_a_beat_being_flushed_is_still_seen_and_after_the_flush_too(
    db: tuple[Path, sessionmaker[Session]],
) -> None:
    path, sm = db
    buf = HeartbeatBuffer()
    buf.put("donora", beat("paused"))
    assert buf.flush(sm) == 1 and stored_status(path) == "paused"
    buf.put("donora", beat("healthy"))

    # another connection holds SQLite's write lock: the flush takes its batch, then waits to write it
    blocker = sqlite3.connect(path, timeout=30, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    flushed: list[int] = []
    t = threading.Thread(target=lambda: flushed.append(buf.flush(sm)))
    t.start()
    try:
        wait_for(lambda: buf._pending == {}, timeout=10, interval=0.01, what="the flush to take its batch")
        assert stored_status(path) == "paused"  # not written yet
        seen = buf.peek("donora")
        assert seen is not None and seen.status == "healthy"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        t.join(30)
    assert flushed == [1] and stored_status(path) == "healthy"
    seen = buf.peek("donora")
    assert seen is not None and seen.status == "healthy"  # a row read before the commit is still overruled
    buf.drop("donora")  # left or revoked: forgotten
    assert buf.peek("donora") is None and buf.flush(sm) == 0
