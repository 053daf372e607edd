"""The services' schema (uploads, notes) through Alembic, driven from code: `upgrade(connection)` brings the
services' database to the current revision. A database made before the migrations existed (tables from
`create_all`, no alembic_version) is stamped with the first revision, which made the same tables."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, inspect

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST = "0001_uploads_notes"
HEAD = "0007_batches_payer"


def config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Connection, revision: str = "head") -> None:
    cfg = config(connection)
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables and {"uploads", "notes"} <= tables:
        command.stamp(cfg, FIRST)
    command.upgrade(cfg, revision)


def current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()
