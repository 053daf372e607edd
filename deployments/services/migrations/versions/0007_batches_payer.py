"""batches: the key that created the batch and its quota then, which its items' tokens are charged to

Revision ID: 0007_batches_payer
Revises: 0006_drop_ingest_state_ix
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_batches_payer"
down_revision = "0006_drop_ingest_state_ix"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # null on a batch made before: its items are not charged (as before)
    op.add_column("batches", sa.Column("key_id", sa.String(length=40), nullable=True))
    op.add_column("batches", sa.Column("quota", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("batches", "quota")
    op.drop_column("batches", "key_id")
