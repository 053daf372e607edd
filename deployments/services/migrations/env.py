"""Alembic environment of the services' database (uploads, notes): runs on the connection that
deployments.services.migrate hands in."""

from __future__ import annotations

from alembic import context

from deployments.services.db import Base

target_metadata = Base.metadata


def run() -> None:
    conn = context.config.attributes.get("connection")
    if conn is None:
        raise SystemExit(
            "run the services' migrations through deployments.services.migrate.upgrade(connection)"
        )
    context.configure(connection=conn, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


run()
