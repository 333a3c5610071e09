"""the columns that hold JSON are json columns on PostgreSQL (their text kept as it is)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, nullable): every column that holds JSON text
JSON_COLUMNS = (
    ("study_events", "detail", True),
    ("jobs", "series_uids", False),
    ("jobs", "destinations", False),
    ("jobs", "timings", False),
    ("jobs", "qa_reasons", True),
    ("job_events", "detail", True),
    ("results", "encodings", False),
    ("purges", "paths", False),
    ("commitment_reports", "committed", False),
    ("commitment_reports", "failed", False),
)


def _retype(to_json: bool) -> None:
    # SQLite keeps JSON as TEXT, as these columns already are: nothing to change there, and a
    # batch rebuild of `jobs` or `results` would cascade its DROP TABLE to their child rows
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column, nullable in JSON_COLUMNS:
        op.alter_column(
            table,
            column,
            type_=sa.JSON() if to_json else sa.Text(),
            existing_type=sa.Text() if to_json else sa.JSON(),
            existing_nullable=nullable,
            postgresql_using=f"{column}::{'json' if to_json else 'text'}",
        )


def upgrade() -> None:
    _retype(to_json=True)


def downgrade() -> None:
    _retype(to_json=False)
