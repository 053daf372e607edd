"""request metrics per cluster: the core's and each edge's Serve ingress, rollups and queues keyed by cluster

Revision ID: 0011_request_metrics_per_cluster
Revises: 0010_contributions
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_request_metrics_per_cluster"
down_revision = "0010_contributions"
branch_labels = None
depends_on = None

_VALUES = ("requests", "latency_count", "latency_sum_ms", "latency_buckets")


def _cluster() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("cluster", sa.String(length=16), nullable=False, server_default="core")


def _request_minutes(name: str, with_cluster: bool) -> None:
    key = ["minute", *(["cluster"] if with_cluster else []), "application", "route", "status_code"]
    op.create_table(
        name,
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        *([_cluster()] if with_cluster else []),
        sa.Column("application", sa.String(length=128), nullable=False),
        sa.Column("route", sa.String(length=255), nullable=False),
        sa.Column("status_code", sa.String(length=8), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("latency_count", sa.Integer(), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("latency_buckets", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint(*key),
    )


def _rekey_request_minutes(with_cluster: bool) -> None:
    """The rollups keep their rows (every one so far is the core's): the key gains or loses `cluster`. SQLite
    cannot alter a primary key, so the rows move to a new table; PostgreSQL swaps the constraint in place."""
    key = ["minute", *(["cluster"] if with_cluster else []), "application", "route", "status_code"]
    if op.get_bind().dialect.name == "sqlite":
        cols = ", ".join(["minute", "application", "route", "status_code", *_VALUES])
        _request_minutes("_request_minutes_new", with_cluster)
        op.execute(sa.text(f"INSERT INTO _request_minutes_new ({cols}) SELECT {cols} FROM request_minutes"))
        op.drop_table("request_minutes")
        op.rename_table("_request_minutes_new", "request_minutes")
        return
    if with_cluster:
        op.add_column("request_minutes", _cluster())
    op.drop_constraint("request_minutes_pkey", "request_minutes", type_="primary")
    op.create_primary_key("request_minutes_pkey", "request_minutes", key)
    if not with_cluster:
        op.drop_column("request_minutes", "cluster")


def _deployment_load(with_cluster: bool) -> None:
    # the table only ever holds the collector's latest reading: rebuilt, the next pass fills it again
    op.drop_table("deployment_load")
    op.create_table(
        "deployment_load",
        *([_cluster()] if with_cluster else []),
        sa.Column("application", sa.String(length=128), nullable=False),
        sa.Column("deployment", sa.String(length=128), nullable=False),
        sa.Column("queued", sa.Float(), nullable=False),
        sa.Column("ongoing", sa.Float(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(*(["cluster"] if with_cluster else []), "application", "deployment"),
    )


def upgrade() -> None:
    _rekey_request_minutes(with_cluster=True)
    _deployment_load(with_cluster=True)


def downgrade() -> None:
    # an edge's rows would collide with the core's under the old key: only the core's are kept
    op.execute(sa.text("DELETE FROM request_minutes WHERE cluster <> 'core'"))
    _rekey_request_minutes(with_cluster=False)
    _deployment_load(with_cluster=False)
