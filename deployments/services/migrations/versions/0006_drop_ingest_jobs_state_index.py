"""ingest_jobs: drop the index on state alone, which (state, finished_at) covers

Revision ID: 0006_drop_ingest_state_ix
Revises: 0005_ingest_jobs_finished
Create Date: 2026-12-06
"""

from alembic import op

revision = "0006_drop_ingest_state_ix"
down_revision = "0005_ingest_jobs_finished"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every query on state alone (the runner's queued and running jobs, the sweep) can read the leading column of
    # ix_ingest_jobs_state_finished: a second index on the same column only costs each state change a write
    op.drop_index("ix_ingest_jobs_state", table_name="ingest_jobs")


def downgrade() -> None:
    op.create_index("ix_ingest_jobs_state", "ingest_jobs", ["state"], unique=False)
