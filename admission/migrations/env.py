"""Alembic environment: runs on the connection handed in by admission.migrate, or on RMA_DATABASE_URL."""

from __future__ import annotations

from alembic import context

from admission.db import make_engine
from admission.models import Base
from rma_ray.settings import Settings

target_metadata = Base.metadata


def run() -> None:
    conn = context.config.attributes.get("connection")
    if conn is not None:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(Settings().resolved_database_url)
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
