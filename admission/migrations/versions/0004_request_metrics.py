"""Serve request metrics: per-minute rollups, queues per deployment, scrape cursors

Revision ID: 0004_request_metrics
Revises: 0003_overlay
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_request_metrics"
down_revision = "0003_overlay"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_minutes",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("application", sa.String(length=128), nullable=False),
        sa.Column("route", sa.String(length=255), nullable=False),
        sa.Column("status_code", sa.String(length=8), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("latency_count", sa.Integer(), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("latency_buckets", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "application", "route", "status_code"),
    )
    op.create_table(
        "deployment_load",
        sa.Column("application", sa.String(length=128), nullable=False),
        sa.Column("deployment", sa.String(length=128), nullable=False),
        sa.Column("queued", sa.Float(), nullable=False),
        sa.Column("ongoing", sa.Float(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("application", "deployment"),
    )
    op.create_table(
        "metric_cursors",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("metric_cursors", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_metric_cursors_seen_at"), ["seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("metric_cursors", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_metric_cursors_seen_at"))
    op.drop_table("metric_cursors")
    op.drop_table("deployment_load")
    op.drop_table("request_minutes")
