"""Node leases: a duty (``timers``) that one node of a group holds at a time.

A lease row has an owner (``<node id>/<pid>/<token>``, made when the process starts) and an
expiry. It is taken or renewed by one compare-and-set UPDATE (mine, or expired), and every
action done under it checks it in its own transaction with a write on the row
(:func:`hold`): on PostgreSQL the row lock makes a takeover wait until that transaction
commits, on SQLite the write takes the database's write lock. So an action is never done by
two nodes, even across a hand-over. Times are the database's clock on PostgreSQL (the nodes'
clocks may differ), the process's on SQLite (one host).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_node.catalog.models import NodeLease, utcnow

TIMERS = "timers"  # assembly timers and housekeeping
NEVER = datetime(1970, 1, 1, tzinfo=UTC)


def db_now(session: Session) -> datetime:
    """Now, by the database's clock where it has one shared by every node."""
    if session.get_bind().dialect.name == "postgresql":
        now = session.scalar(select(func.clock_timestamp()))
        if isinstance(now, datetime):
            return now
    return utcnow()


def acquire(session: Session, name: str, owner: str, ttl_s: float) -> bool:
    """Take or renew ``name`` for ``ttl_s`` seconds: True when ``owner`` holds it now."""
    now = db_now(session)
    dialect_insert = (
        postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    )
    session.execute(
        dialect_insert(NodeLease)
        .values(name=name, owner="", expires_at=NEVER)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    result = session.execute(
        update(NodeLease)
        .where(
            NodeLease.name == name,
            or_(NodeLease.owner == owner, NodeLease.expires_at <= now),
        )
        .values(owner=owner, expires_at=now + timedelta(seconds=ttl_s))
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def hold(session: Session, name: str, owner: str) -> bool:
    """Whether ``owner`` holds ``name`` now; if so the row stays locked to the caller's
    transaction (a write on it), so no node takes it over before that transaction ends."""
    now = db_now(session)
    result = session.execute(
        update(NodeLease)
        .where(NodeLease.name == name, NodeLease.owner == owner, NodeLease.expires_at > now)
        .values(owner=NodeLease.owner)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release(session: Session, name: str, owner: str) -> bool:
    """Give ``name`` up at once (a graceful stop): another node takes it at its next renewal."""
    result = session.execute(
        update(NodeLease)
        .where(NodeLease.name == name, NodeLease.owner == owner)
        .values(expires_at=NEVER)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def holder(session: Session, name: str) -> tuple[str, datetime] | None:
    """Who holds ``name`` and until when (expired or not), or None when nobody took it yet."""
    row = session.execute(
        select(NodeLease.owner, NodeLease.expires_at).where(NodeLease.name == name)
    ).first()
    return None if row is None else (row[0], row[1])
