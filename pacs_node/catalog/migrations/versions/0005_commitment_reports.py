"""storage commitment reports received on the destination's own association

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "commitment_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("committed", sa.Text(), nullable=False),
        sa.Column("failed", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commitment_reports")),
    )
    with op.batch_alter_table("commitment_reports", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_commitment_reports_transaction_uid"), ["transaction_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("commitment_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commitment_reports_transaction_uid"))
    op.drop_table("commitment_reports")
