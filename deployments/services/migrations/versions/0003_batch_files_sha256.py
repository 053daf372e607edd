"""an index on batch_files.sha256: a file's delete asks whether another file shares its bytes

Revision ID: 0003_batch_files_sha256
Revises: 0002_batches
Create Date: 2026-12-05
"""

from alembic import op

revision = "0003_batch_files_sha256"
down_revision = "0002_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_batch_files_sha256"), "batch_files", ["sha256"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_batch_files_sha256"), table_name="batch_files")
