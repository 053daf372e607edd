"""WireGuard overlay: each donor's overlay address and public key

Revision ID: 0003_overlay
Revises: 0002_stores
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_overlay"
down_revision = "0002_stores"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("overlay_ip", sa.String(length=45), nullable=True))
        batch_op.add_column(sa.Column("wg_public_key", sa.String(length=44), nullable=True))
        batch_op.create_unique_constraint("uq_workers_overlay_ip", ["overlay_ip"])
        batch_op.create_unique_constraint("uq_workers_wg_public_key", ["wg_public_key"])


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_constraint("uq_workers_wg_public_key", type_="unique")
        batch_op.drop_constraint("uq_workers_overlay_ip", type_="unique")
        batch_op.drop_column("wg_public_key")
        batch_op.drop_column("overlay_ip")
