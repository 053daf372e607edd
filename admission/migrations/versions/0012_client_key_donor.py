"""client keys linked to a donor: a larger default quota while the donor gives to the pool

Revision ID: 0012_client_key_donor
Revises: 0011_request_metrics_per_cluster
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_client_key_donor"
down_revision = "0011_request_metrics_per_cluster"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("client_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("donor_id", sa.String(length=12), nullable=True))
        batch_op.create_index(batch_op.f("ix_client_keys_donor_id"), ["donor_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_client_keys_donor_id_workers", "workers", ["donor_id"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("client_keys", schema=None) as batch_op:
        batch_op.drop_constraint("fk_client_keys_donor_id_workers", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_client_keys_donor_id"))
        batch_op.drop_column("donor_id")
