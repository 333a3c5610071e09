"""storage commitment on deliveries; purges (retention)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "purges",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("paths", sa.Text(), nullable=False),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("files_removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purges")),
    )
    with op.batch_alter_table("purges", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_purges_study_uid"), ["study_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("purges", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_purges_study_uid"))
    op.drop_table("purges")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_uid")
        batch_op.drop_column("commitment")
