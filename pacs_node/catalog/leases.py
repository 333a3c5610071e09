"""Node leases: a duty (``timers``) that one node of a group holds at a time.

A lease row has an owner (``<node id>/<pid>/<token>``, made when the process starts) and an
expiry. It is taken or renewed by one compare-and-set UPDATE (mine, or expired), and every
action done under it checks it in its own transaction with a write on the row
(:func:`hold`): on PostgreSQL the row lock makes a takeover wait until that transaction
commits, on SQLite the write takes the database's write lock. So an action is never done by
two nodes, even across a hand-over. Times are the database's clock on PostgreSQL (the nodes'
clocks may differ), the process's on SQLite (one host).

On PostgreSQL a holder that freezes or loses its network must not keep the row locked: the
transaction that holds the lease is ended by the server once it idles for half the lease
(``idle_in_transaction_session_timeout``, set for that transaction only, so migrations and
long purges elsewhere are not cut), and an acquirer waits at most half its lease for the row
lock (``lock_timeout``) and counts a timeout as "not acquired now".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pacs_node.catalog.clock import db_now
from pacs_node.catalog.models import NodeLease

TIMERS = "timers"  # assembly timers and housekeeping
NEVER = datetime(1970, 1, 1, tzinfo=UTC)


def _bound_ms(ttl_s: float) -> int:
    """How long a lease transaction may idle, or wait for the lease row: half the lease."""
    return max(100, int(ttl_s * 500))


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _bound(session: Session, ttl_s: float) -> None:
    """Limit this transaction's lock waits and idle time to half the lease (PostgreSQL)."""
    if _is_postgresql(session):
        ms = _bound_ms(ttl_s)
        session.execute(text(f"SET LOCAL lock_timeout = {ms}"))
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {ms}"))


def _lock_timed_out(error: OperationalError) -> bool:
    return getattr(error.orig, "sqlstate", None) == "55P03"  # lock_not_available


def acquire(session: Session, name: str, owner: str, ttl_s: float) -> bool:
    """Take or renew ``name`` for ``ttl_s`` seconds: True when ``owner`` holds it now. A
    holder whose transaction keeps the row locked for half the lease leaves it "not now"."""
    _bound(session, ttl_s)
    try:
        return _acquire(session, name, owner, ttl_s)
    except OperationalError as error:
        if not _lock_timed_out(error):
            raise
        session.rollback()
        return False


def _acquire(session: Session, name: str, owner: str, ttl_s: float) -> bool:
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


def hold(session: Session, name: str, owner: str, ttl_s: float) -> bool:
    """Whether ``owner`` holds ``name`` now; if so the row stays locked to the caller's
    transaction (a write on it), so no node takes it over before that transaction ends. On
    PostgreSQL that transaction is ended by the server if it idles for half the lease."""
    _bound(session, ttl_s)
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
