"""document-ingest jobs: one row per job (options, state, per-step progress, checkpoints) and its pages' text

Revision ID: 0004_ingest_jobs
Revises: 0003_batch_files_sha256
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_ingest_jobs"
down_revision = "0003_batch_files_sha256"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=500), nullable=True),
        sa.Column("content_type", sa.String(length=200), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ingest_jobs_owner_created", "ingest_jobs", ["owner", "created_at"], unique=False)
    # NULL keys are distinct in Postgres: only jobs created with an Idempotency-Key are held to one per key
    op.create_index("ix_ingest_jobs_owner_key", "ingest_jobs", ["owner", "idempotency_key"], unique=True)
    op.create_index(op.f("ix_ingest_jobs_state"), "ingest_jobs", ["state"], unique=False)
    op.create_table(
        "ingest_pages",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("ocr", sa.Boolean(), nullable=False),
        sa.Column("needs_ocr", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "number"),
    )


def downgrade() -> None:
    op.drop_table("ingest_pages")
    op.drop_index(op.f("ix_ingest_jobs_state"), table_name="ingest_jobs")
    op.drop_index("ix_ingest_jobs_owner_key", table_name="ingest_jobs")
    op.drop_index("ix_ingest_jobs_owner_created", table_name="ingest_jobs")
    op.drop_table("ingest_jobs")
