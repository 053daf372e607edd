"""The services' rows in Postgres (SQLAlchemy 2.0 ORM): upload metadata, notes, the Batch API's files,
batches and per-item rows, and the document-ingest jobs with their checkpointed pages. The database is the
Postgres store's (found through its supervisor), in a database of its own, created on first use and brought to
the current schema by the services' Alembic migrations (deployments/services/migrations)."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from deployments.gateway.refusal import unavailable
from deployments.services.recheck import Recheck, address

log = logging.getLogger("rma.services.db")


def _now() -> datetime:
    return datetime.now(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FILE_ID = re.compile(r"file-([0-9a-f]{14})[0-9a-f]{20}")


def new_file_id(at: datetime) -> str:
    """`file-`, the creation time in microseconds (14 hex digits), 20 random hex digits: a list's `after`
    cursor can be placed by its id alone, so it stays usable once its file is deleted."""
    return f"file-{(at - _EPOCH) // timedelta(microseconds=1):014x}{secrets.token_hex(10)}"


def file_id_time(file_id: str) -> datetime | None:
    """The creation time a file id carries (exact: a row's created_at is this), or None for another shape."""
    m = _FILE_ID.fullmatch(file_id)
    return _EPOCH + timedelta(microseconds=int(m.group(1), 16)) if m else None


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


class BatchFile(Base):
    """A Batch API file: an input (purpose `batch`, checked line by line on upload) or an output or error file
    (`batch_output`); its bytes are a blob on the uploads volume, named by their SHA-256."""

    __tablename__ = "batch_files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # new_file_id: BatchFile.create
    owner: Mapped[str] = mapped_column(String(200), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # a delete asks whether others share it
    filename: Mapped[str | None] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(20))
    size: Mapped[int] = mapped_column(BigInteger)
    endpoint: Mapped[str | None] = mapped_column(String(40))  # an input file's one url
    lines: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    @classmethod
    def create(cls, **fields: Any) -> BatchFile:
        """A new file row whose id carries its created_at (`new_file_id`)."""
        fid = new_file_id(_now())
        return cls(id=fid, created_at=file_id_time(fid), **fields)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: f"batch_{uuid.uuid4().hex}")
    owner: Mapped[str] = mapped_column(String(200), index=True)
    endpoint: Mapped[str] = mapped_column(String(40))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(20), index=True)
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the client key that created the batch, and its quota then (`rma_ray.wire.Quota`): its items' tokens
    # count against that key's day, as its online requests' do (None: not charged, a batch from before)
    key_id: Mapped[str | None] = mapped_column(String(40))
    quota: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class BatchItem(Base):
    """One request of a batch, keyed by (batch, custom_id): its output is written once, by an upsert that
    leaves a finished row alone, whatever runner (or retry of it) gets there."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_batch_status", "batch_id", "status"),)

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    line: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the output or error file's line
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class IngestJob(Base):
    """A document-ingest job (`deployments.services.ingest`): its options, its state, one entry per step
    ({name, state, done, total}) and what each finished step left for the next (`result`), so a job whose
    runner died resumes at the step it was in. `idempotency_key` is unique per owner while the job exists."""

    __tablename__ = "ingest_jobs"
    __table_args__ = (
        Index("ix_ingest_jobs_owner_created", "owner", "created_at"),
        Index("ix_ingest_jobs_owner_key", "owner", "idempotency_key", unique=True),
        # the registry figures' recently finished jobs and the clean-up's long finished ones
        Index("ix_ingest_jobs_state_finished", "state", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: f"job_{uuid.uuid4().hex}")
    owner: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    upload_id: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str | None] = mapped_column(String(500))
    content_type: Mapped[str] = mapped_column(String(200))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # indexed by ix_ingest_jobs_state_finished
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    revision: Mapped[int] = mapped_column(Integer, default=0)  # +1 at every change a client can see
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class IngestPage(Base):
    """One page's text as a job's parse or OCR step left it (the checkpoint OCR resumes from)."""

    __tablename__ = "ingest_pages"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    ocr: Mapped[bool] = mapped_column(Boolean, default=False)
    needs_ocr: Mapped[bool] = mapped_column(Boolean, default=False)


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


def connection_error(exc: BaseException) -> bool:
    """Whether `exc` is the database being unreachable (refused, cut, gone), not a refused statement: what
    makes a `Database` ask again where its store is."""
    import psycopg
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(
        exc, OperationalError | InterfaceError | psycopg.OperationalError | psycopg.InterfaceError
    )


class Database:
    """The engine, made on first use: a replica starts even while Postgres is still coming up, and answers 503
    (not a crash loop) until it is there. A store moved to another donor (or restarted elsewhere) has a new
    address: after a connection error the endpoint is asked again (at most every `recheck_s`, it is a call to
    the store's supervisor), and a changed one gets a new engine; `generation` counts the engines made, for
    the users of `endpoint` that keep connections of their own (the batch queue)."""

    def __init__(
        self, database: str, endpoint: Callable[[str], Any] = store_endpoint, recheck_s: float = 2.0
    ) -> None:
        self.database, self._endpoint = database, endpoint
        self._lock = threading.Lock()
        self._sessions: sessionmaker[Any] | None = None
        self.engine: Engine | None = None
        self.endpoint: Any = None  # the one the engine was made for
        self.generation = 0
        self._recheck = Recheck(recheck_s)

    def connection_failed(self) -> None:
        """A connection to the store failed (the engine's own errors call this): the next `sessions()` asks
        the endpoint again, if it was not asked within `recheck_s`."""
        self._recheck.failed()

    def sessions(self) -> sessionmaker[Any]:
        with self._lock:
            recheck = self._sessions is not None and self._recheck.due()
        if (
            recheck
        ):  # the endpoint asked outside the lock: a slow supervisor stalls this caller, not every one
            self._moved()
        with self._lock:
            if self._sessions is None:
                try:
                    ep = self._endpoint("postgres")
                except Exception as exc:
                    raise unavailable(
                        "store_unavailable", f"the Postgres store is not reachable yet: {type(exc).__name__}"
                    ) from None
                self._open(ep)
            assert self._sessions is not None
            return self._sessions

    def _moved(self) -> None:
        try:
            ep = self._endpoint("postgres")
        except Exception as exc:  # the supervisor is not there (being restarted): the old address stays
            log.warning("the Postgres store's endpoint could not be asked: %s: %s", type(exc).__name__, exc)
            return
        with self._lock:
            if self._sessions is None or address(ep) == address(self.endpoint):
                return  # not made yet (the first-use path asks), or the same address
            log.warning("the Postgres store moved to %s:%s: a new engine", ep.host, ep.port)
            if self.engine is not None:
                self.engine.dispose()
            self.engine, self._sessions = None, None
            self._open(ep)

    def _open(self, ep: Any) -> None:
        from deployments.services import migrate

        try:
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
                f"the services' database could not be brought to the current schema: {type(exc).__name__}",
            ) from None

        def failed(context: Any) -> None:
            if connection_error(context.original_exception) or connection_error(context.sqlalchemy_exception):
                self.connection_failed()

        event.listen(engine, "handle_error", failed)
        self.engine, self.endpoint = engine, ep
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._recheck.asked()
        self.generation += 1
