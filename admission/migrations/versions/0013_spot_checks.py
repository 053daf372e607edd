"""spot-checks of edge answers: each verdict (passes pruned, failing samples bounded) and each edge's decayed
pass rate and quarantine

Revision ID: 0013_spot_checks
Revises: 0012_client_key_donor
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_spot_checks"
down_revision = "0012_client_key_donor"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spot_checks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("edge", sa.String(length=64), nullable=False),
        sa.Column("app", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=200), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("reporter", sa.String(length=64), nullable=False),
        sa.Column("sample", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("spot_checks", schema=None) as batch_op:
        batch_op.create_index("ix_spot_checks_edge_passed_at", ["edge", "passed", "at"], unique=False)
    op.create_table(
        "edge_reputation",
        sa.Column("edge", sa.String(length=64), nullable=False),
        sa.Column("checks", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.BigInteger(), nullable=False),
        sa.Column("passed_weight", sa.Float(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("last_check_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("quarantine_reason", sa.Text(), nullable=True),
        sa.Column("reset_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("edge"),
    )


def downgrade() -> None:
    op.drop_table("edge_reputation")
    with op.batch_alter_table("spot_checks", schema=None) as batch_op:
        batch_op.drop_index("ix_spot_checks_edge_passed_at")
    op.drop_table("spot_checks")
