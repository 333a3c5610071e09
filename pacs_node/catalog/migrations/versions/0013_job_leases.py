"""job claims of Celery workers hold a lease; when and how often a job was handed to the broker

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("lease_expires_at", "published_at")


def upgrade() -> None:
    # NULL for every job already recorded: no lease (a local worker's claim), never published
    for column in COLUMNS:
        op.add_column("jobs", sa.Column(column, sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "jobs", sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later), not a batch rebuild: rebuilding
    # `jobs` with foreign keys on would cascade its DROP TABLE to its events and results
    op.drop_column("jobs", "publish_count")
    for column in reversed(COLUMNS):
        op.drop_column("jobs", column)
