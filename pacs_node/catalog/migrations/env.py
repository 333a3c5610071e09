"""Alembic environment: runs on the connection the node hands over (see ``catalog.db.migrate``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from pacs_node.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        # Command-line alembic (developers writing a migration): URL from alembic's -x url=...
        url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///var/catalog.sqlite")
        engine = create_engine(url)
        with engine.begin() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, render_as_batch=True
            )
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
