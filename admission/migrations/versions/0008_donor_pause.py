"""donor pause: when an off-schedule donor's next window starts (its status is the heartbeat's own)

Revision ID: 0008_donor_pause
Revises: 0007_edge_clusters
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_donor_pause"
down_revision = "0007_edge_clusters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resume_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("resume_at")
