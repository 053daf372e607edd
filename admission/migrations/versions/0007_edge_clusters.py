"""edge clusters: an invite's edge, a worker's cluster, tier demand per cluster; sensitive client keys

Revision ID: 0007_edge_clusters
Revises: 0006_service_keys_store_sizes
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_edge_clusters"
down_revision = "0006_service_keys_store_sizes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("edge", sa.String(length=16), nullable=True))
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cluster", sa.String(length=16), nullable=False, server_default="core"))
        batch_op.create_index("ix_workers_cluster", ["cluster"], unique=False)
    with op.batch_alter_table("client_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sensitive", sa.Boolean(), nullable=False, server_default=sa.false()))
    # demand is per cluster now: the table only ever holds the reconciler's latest reading, so it is rebuilt
    op.drop_table("tier_demand")
    op.create_table(
        "tier_demand",
        sa.Column("cluster", sa.String(length=16), nullable=False, server_default="core"),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("cluster", "tier"),
    )


def downgrade() -> None:
    op.drop_table("tier_demand")
    op.create_table(
        "tier_demand",
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tier"),
    )
    with op.batch_alter_table("client_keys", schema=None) as batch_op:
        batch_op.drop_column("sensitive")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index("ix_workers_cluster")
        batch_op.drop_column("cluster")
    with op.batch_alter_table("invites", schema=None) as batch_op:
        batch_op.drop_column("edge")
