"""the Batch API: files, batches, per-item rows, and procrastinate's queue (in its own Postgres schema)

Revision ID: 0002_batches
Revises: 0001_uploads_notes
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_batches"
down_revision = "0001_uploads_notes"
branch_labels = None
depends_on = None

QUEUE_SCHEMA = "procrastinate"  # deployments.services.batches connects with this search_path


def upgrade() -> None:
    op.create_table(
        "batch_files",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=500), nullable=True),
        sa.Column("purpose", sa.String(length=20), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("endpoint", sa.String(length=40), nullable=True),
        sa.Column("lines", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_batch_files_owner"), "batch_files", ["owner"], unique=False)
    stamps = [
        sa.Column(name, sa.DateTime(timezone=True), nullable=True)
        for name in (
            "in_progress_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        )
    ]
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("endpoint", sa.String(length=40), nullable=False),
        sa.Column("input_file_id", sa.String(length=40), nullable=False),
        sa.Column("completion_window", sa.String(length=10), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("output_file_id", sa.String(length=40), nullable=True),
        sa.Column("error_file_id", sa.String(length=40), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        *stamps,
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_batches_owner"), "batches", ["owner"], unique=False)
    op.create_index(op.f("ix_batches_status"), "batches", ["status"], unique=False)
    op.create_table(
        "batch_items",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("custom_id", sa.String(length=512), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "custom_id"),
    )
    op.create_index("ix_batch_items_batch_status", "batch_items", ["batch_id", "status"], unique=False)
    # procrastinate's own schema SQL (its tables, functions, triggers), in a Postgres schema of its own so
    # that the services' tables and Alembic's comparisons never see it; on the raw psycopg connection (same
    # transaction), which runs a parameterless statement as is (the SQL has `%` and `::` in it)
    from procrastinate.schema import SchemaManager

    op.execute(f"CREATE SCHEMA {QUEUE_SCHEMA}")
    raw = op.get_bind().connection.driver_connection
    raw.execute(f"SET LOCAL search_path TO {QUEUE_SCHEMA}")
    raw.execute(SchemaManager.get_schema())
    raw.execute("SET LOCAL search_path TO DEFAULT")


def downgrade() -> None:
    op.execute(f"DROP SCHEMA {QUEUE_SCHEMA} CASCADE")
    op.drop_index("ix_batch_items_batch_status", table_name="batch_items")
    op.drop_table("batch_items")
    op.drop_index(op.f("ix_batches_status"), table_name="batches")
    op.drop_index(op.f("ix_batches_owner"), table_name="batches")
    op.drop_table("batches")
    op.drop_index(op.f("ix_batch_files_owner"), table_name="batch_files")
    op.drop_table("batch_files")
