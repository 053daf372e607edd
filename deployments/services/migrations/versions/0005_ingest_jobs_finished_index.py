"""ingest_jobs: an index on (state, finished_at) for the registry figures' recent jobs and the clean-up

Revision ID: 0005_ingest_jobs_finished
Revises: 0004_ingest_jobs
Create Date: 2026-12-05
"""

from alembic import op

revision = "0005_ingest_jobs_finished"
down_revision = "0004_ingest_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the figures' "finished in the last 10 minutes" and the clean-up's "finished over N days ago" read a range
    # of finished_at within the final states: without it they read every kept finished job
    op.create_index("ix_ingest_jobs_state_finished", "ingest_jobs", ["state", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ingest_jobs_state_finished", table_name="ingest_jobs")
