"""contribution ledger: per donor and minute (per hour after 48 h), CPU/GPU-seconds, requests, LLM tokens

Revision ID: 0010_contributions
Revises: 0009_client_quotas
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_contributions"
# the chain at merge is 0007 -> 0008 (donor pause) -> 0009 (client quotas) -> 0010; this branch was written
# before 0008 and 0009 existed and ran its migrations on 0007 (see the merge note in the branch's report)
down_revision = "0009_client_quotas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contribution_minutes",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("worker_id", sa.String(length=12), nullable=False),
        sa.Column("cpu_s", sa.Float(), nullable=False),
        sa.Column("gpu_s", sa.Float(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["worker_id"], ["workers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("minute", "worker_id"),
    )
    with op.batch_alter_table("contribution_minutes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contribution_minutes_worker_id"), ["worker_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("contribution_minutes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contribution_minutes_worker_id"))
    op.drop_table("contribution_minutes")
