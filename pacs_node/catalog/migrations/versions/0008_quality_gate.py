"""the quality gate's verdict on each job: mode, verdict, reasons, and an operator's decision

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("qa_mode", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("qa_verdict", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("qa_reasons", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("qa_decision", sa.String(length=16), nullable=True))


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later), not a batch rebuild: rebuilding
    # `jobs` with foreign keys on would cascade its DROP TABLE to results and deliveries
    for column in ("qa_decision", "qa_reasons", "qa_verdict", "qa_mode"):
        op.drop_column("jobs", column)
