"""delivery claims with an owner and a lease; who may answer a commitment request; results
built for one destination

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_ae", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("commitment_hosts", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=160), nullable=True))
        batch_op.add_column(
            sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("commitment_reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peer_address", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("refused_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("destination", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("destination")
    with op.batch_alter_table("commitment_reports", schema=None) as batch_op:
        batch_op.drop_column("refused_at")
        batch_op.drop_column("peer_address")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("commitment_hosts")
        batch_op.drop_column("commitment_ae")
