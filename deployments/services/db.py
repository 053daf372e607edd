"""The services' rows in Postgres (SQLAlchemy 2.0 ORM): upload metadata and notes. The database is the
Postgres store's (found through its supervisor), in a database of its own, created on first use and brought to
the current schema by the services' Alembic migrations (deployments/services/migrations)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text, create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from deployments.gateway.refusal import unavailable

log = logging.getLogger("rma.services.db")


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Upload(Base):
    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    filename: Mapped[str | None] = mapped_column(String(500))
    content_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sha256": self.sha256,
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
            "created_at": self.created_at.isoformat(),
        }


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    title: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "body": self.body,
            "tags": list(self.tags or []),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def store_endpoint(store: str, timeout: float = 30.0) -> Any:
    from deployments.stores import supervisor

    return supervisor.endpoint(store, timeout)


def _ensure_database(ep: Any, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=ep.host,
        port=ep.port,
        user=ep.user,
        password=ep.password,
        dbname=ep.database,
        autocommit=True,
        connect_timeout=10,
    ) as c:
        if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
            try:
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:  # another replica won the race
                pass


class Database:
    """The engine, made on first use: a replica starts even while Postgres is still coming up, and answers 503
    (not a crash loop) until it is there."""

    def __init__(self, database: str, endpoint: Callable[[str], Any] = store_endpoint) -> None:
        self.database, self._endpoint = database, endpoint
        self._lock = threading.Lock()
        self._sessions: sessionmaker[Any] | None = None
        self.engine: Engine | None = None

    def sessions(self) -> sessionmaker[Any]:
        from deployments.services import migrate

        with self._lock:
            if self._sessions is None:
                try:
                    ep = self._endpoint("postgres")
                    _ensure_database(ep, self.database)
                    url = URL.create(
                        "postgresql+psycopg",
                        username=ep.user,
                        password=ep.password,
                        host=ep.host,
                        port=ep.port,
                        database=self.database,
                    )
                    engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
                    with engine.connect():
                        pass
                except Exception as exc:
                    raise unavailable(
                        "store_unavailable", f"the Postgres store is not reachable yet: {type(exc).__name__}"
                    ) from None
                try:
                    with engine.begin() as c:
                        c.execute(text("SELECT pg_advisory_xact_lock(4711)"))  # one replica migrates
                        migrate.upgrade(c)
                except Exception as exc:
                    log.exception("migrating the services' database failed")
                    engine.dispose()
                    raise unavailable(
                        "schema_migration_failed",
                        f"the services' database could not be brought to "
                        f"the current schema: {type(exc).__name__}",
                    ) from None
                self.engine, self._sessions = engine, sessionmaker(engine, expire_on_commit=False)
            return self._sessions
