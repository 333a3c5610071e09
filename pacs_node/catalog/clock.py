"""The group's clock: the database's where several nodes share it (PostgreSQL), so nodes whose
clocks differ agree on arrival, stable and routed times; the process's on SQLite (one host)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.catalog.models import utcnow


def db_clock(session: Session) -> datetime | None:
    """Now by the database's clock on PostgreSQL (``clock_timestamp()``), else None."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    now = session.scalar(select(func.clock_timestamp()))
    return now if isinstance(now, datetime) else None


def db_now(session: Session) -> datetime:
    """Now, by the database's clock where it has one shared by every node."""
    return db_clock(session) or utcnow()
