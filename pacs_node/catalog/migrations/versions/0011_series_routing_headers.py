"""each series keeps the routing header of the instances that lead and end it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("routing_first", "routing_last")


def upgrade() -> None:
    # JSON columns on PostgreSQL, TEXT on SQLite (as models.JSONText declares them). NULL for
    # every series already recorded: routing reads those series' files, as before.
    json_type = sa.Text() if op.get_bind().dialect.name == "sqlite" else sa.JSON()
    for column in COLUMNS:
        op.add_column("series", sa.Column(column, json_type, nullable=True))


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later), not a batch rebuild: rebuilding
    # `series` with foreign keys on would cascade its DROP TABLE to its instances
    for column in reversed(COLUMNS):
        op.drop_column("series", column)
