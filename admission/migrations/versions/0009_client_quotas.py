"""client quotas: per-key overrides on client_keys; client_usage (per key per UTC day, reported by the gateway)

Revision ID: 0009_client_quotas
Revises: 0008_donor_pause
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_client_quotas"
down_revision = "0008_donor_pause"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("client_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quota_requests_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("quota_tokens_per_day", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("quota_upload_bytes_per_day", sa.BigInteger(), nullable=True))
    op.create_table(
        "client_usage",
        sa.Column("key_id", sa.String(length=12), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("upload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "day"),
    )


def downgrade() -> None:
    op.drop_table("client_usage")
    with op.batch_alter_table("client_keys", schema=None) as batch_op:
        batch_op.drop_column("quota_upload_bytes_per_day")
        batch_op.drop_column("quota_tokens_per_day")
        batch_op.drop_column("quota_requests_per_minute")
