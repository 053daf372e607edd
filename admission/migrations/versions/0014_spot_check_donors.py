"""spot-checks name the edge donor that answered (the edge head's HAProxy: rma_ray.upstream), and each such
donor keeps its own decayed pass rate

Revision ID: 0014_spot_check_donors
Revises: 0013_spot_checks
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_spot_check_donors"
down_revision = "0013_spot_checks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("spot_checks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("donor", sa.String(length=12), nullable=True))
        batch_op.create_index("ix_spot_checks_donor", ["donor"], unique=False)
    op.create_table(
        "donor_reputation",
        sa.Column("worker_id", sa.String(length=12), nullable=False),
        sa.Column("edge", sa.String(length=64), nullable=False),
        sa.Column("checks", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.BigInteger(), nullable=False),
        sa.Column("passed_weight", sa.Float(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("last_check_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("worker_id"),
    )
    with op.batch_alter_table("donor_reputation", schema=None) as batch_op:
        batch_op.create_index("ix_donor_reputation_edge", ["edge"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("donor_reputation", schema=None) as batch_op:
        batch_op.drop_index("ix_donor_reputation_edge")
    op.drop_table("donor_reputation")
    with op.batch_alter_table("spot_checks", schema=None) as batch_op:
        batch_op.drop_index("ix_spot_checks_donor")
        batch_op.drop_column("donor")
        batch_op.drop_column("upstream")
