"""The services' Alembic migrations on a real PostgreSQL (a private server, session-scoped, ~3 s): they make the
tables the ORM models describe, round-trip, and adopt a database made by the old `create_all`."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from deployments.services import migrate
from deployments.services.db import Base, Note, Upload
from tests.support import Postgres


def test_migrations_match_the_models_and_round_trip(postgres: Postgres) -> None:
    engine = create_engine(postgres.create_database())
    try:
        with engine.begin() as c:
            migrate.upgrade(c)
        with engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
            assert diff == [], f"models and migrations disagree; add a migration: {diff}"
            # procrastinate's queue lives in its own schema
            assert "procrastinate_jobs" in inspect(c).get_table_names("procrastinate")
            assert migrate.current(c) == migrate.HEAD
        with engine.begin() as c:
            migrate.upgrade(c)  # again: nothing to do
            migrate.command.downgrade(migrate.config(c), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_a_database_made_by_create_all_is_adopted(postgres: Postgres) -> None:
    engine = create_engine(postgres.create_database())
    try:
        # the old create_all knew uploads and notes only
        Base.metadata.create_all(engine, tables=[Upload.__table__, Note.__table__])
        with engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO notes (owner, title, body, tags, created_at, updated_at) "
                "VALUES ('a', 't', 'b', '[]', now(), now())"
            )
        with engine.begin() as c:
            migrate.upgrade(c)
        with engine.connect() as c:
            assert migrate.current(c) == migrate.HEAD
            assert c.exec_driver_sql("SELECT count(*) FROM notes").scalar() == 1
    finally:
        engine.dispose()
