"""Node registrations: one running process per ``node_id`` on a shared catalog.

Everything a node owns in the group is named by its ``node_id``: the timer lease
(``<node id>/<pid>/<token>``), the outbox claims it takes back at start, its partial files in
the spool's ``.incoming/``. Two processes configured with the same ``node_id`` would take each
other's claims for their own, so a node registers at start (host, pid, owner token, start
time) and refreshes a heartbeat on a thread of its own every third of the lease time; a start
finding a live row (heartbeat fresher than twice the lease time: :data:`STALE_AFTER`) of
another process under its ``node_id`` is refused. A process whose heartbeat finds its row
taken over stops (fencing); one whose row is gone (deleted, a restored database) writes it
again.
A stale row (its process died or was cut off) is taken over, and so is one of an earlier
process of this node that is gone (a restart need not wait out the lease): told by the
process identity the row records (:mod:`pacs_node.process_identity`: boot, pid namespace, pid
and start time), never by the host name and pid alone, which containers share.

Times are the database's clock on PostgreSQL (the hosts' clocks may differ), the process's
on SQLite (one host).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_node.catalog.clock import db_now
from pacs_node.catalog.models import NodeRegistration
from pacs_node.process_identity import ProcessIdentity

STALE_AFTER = 2  # lease times without a heartbeat before a registration is stale


class Beat(StrEnum):
    BEATING = "beating"  # the row is this process's; its heartbeat is written
    RESTORED = "restored"  # the row was missing: written again
    TAKEN = "taken"  # another process holds the row now: this one must stop


INSERT_TRIES = 5


@dataclass(frozen=True, slots=True)
class RegisteredNode:
    node_id: str
    owner: str
    host: str
    pid: int
    identity: ProcessIdentity
    started_at: datetime
    heartbeat_at: datetime
    live: bool  # its heartbeat is fresher than STALE_AFTER lease times


def _row(found: NodeRegistration, now: datetime, ttl_s: float) -> RegisteredNode:
    return RegisteredNode(
        found.node_id,
        found.owner,
        found.host,
        found.pid,
        ProcessIdentity(found.boot_id, found.pid_ns, found.pid, found.pid_start),
        found.started_at,
        found.heartbeat_at,
        found.heartbeat_at > now - timedelta(seconds=STALE_AFTER * ttl_s),
    )


def register(
    session: Session,
    node_id: str,
    owner: str,
    host: str,
    identity: ProcessIdentity,
    ttl_s: float,
    *,
    gone: Callable[[RegisteredNode], bool] | None = None,
) -> RegisteredNode | None:
    """Register this process as ``node_id``; None when it is registered now, else the live
    registration of another process that holds ``node_id`` (nothing is changed then).
    ``gone(row)``: whether a live row is of an earlier process of this node that is no longer
    running (then it is taken over)."""
    values = _values(session, node_id, owner, host, identity)
    for _ in range(INSERT_TRIES):
        if _insert(session, values):
            return None
        # Two starts at once: PostgreSQL makes the second insert wait for the first one's
        # commit; on SQLite the insert took the write lock. Either way what is read is settled.
        found = session.scalars(
            select(NodeRegistration).where(NodeRegistration.node_id == node_id).with_for_update()
        ).one_or_none()
        if found is None:
            continue  # its holder left (a graceful stop) in between: insert again
        held = _row(found, values["started_at"], ttl_s)
        if held.owner != owner and held.live and not (gone is not None and gone(held)):
            return held
        session.execute(
            update(NodeRegistration).where(NodeRegistration.node_id == node_id).values(**values)
        )
        return None
    raise RuntimeError(f"node_id {node_id!r}: its registration came and went {INSERT_TRIES} times")


def _values(
    session: Session, node_id: str, owner: str, host: str, identity: ProcessIdentity
) -> dict[str, Any]:
    now = db_now(session)
    return {
        "node_id": node_id,
        "owner": owner,
        "host": host,
        "pid": identity.pid,
        "boot_id": identity.boot_id,
        "pid_ns": identity.pid_ns,
        "pid_start": identity.start,
        "started_at": now,
        "heartbeat_at": now,
    }


def _insert(session: Session, values: dict[str, Any]) -> bool:
    """Insert the registration unless ``node_id`` has one; whether it was inserted."""
    dialect_insert = (
        postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    )
    # RETURNING, not the row count: an ORM-enabled insert may not report one (-1)
    inserted = session.scalar(
        dialect_insert(NodeRegistration)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["node_id"])
        .returning(NodeRegistration.node_id)
    )
    return inserted is not None


def beat(session: Session, node_id: str, owner: str, host: str, identity: ProcessIdentity) -> Beat:
    """Refresh this process's heartbeat. :attr:`Beat.TAKEN` when its row is another
    process's now (taken over after it went stale); a missing row is written again."""
    result = session.execute(
        update(NodeRegistration)
        .where(NodeRegistration.node_id == node_id, NodeRegistration.owner == owner)
        .values(heartbeat_at=db_now(session))
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return Beat.BEATING
    if _insert(session, _values(session, node_id, owner, host, identity)):
        return Beat.RESTORED
    return Beat.TAKEN


def leave(session: Session, node_id: str, owner: str) -> None:
    """Remove this process's registration (a graceful stop): ``node_id`` is free at once."""
    session.execute(
        delete(NodeRegistration).where(
            NodeRegistration.node_id == node_id, NodeRegistration.owner == owner
        )
    )


def prune(session: Session, older_than: timedelta) -> int:
    """Remove the registrations whose last heartbeat is older than ``older_than`` (nodes taken
    out of the group for good); how many went."""
    result = session.execute(
        delete(NodeRegistration).where(NodeRegistration.heartbeat_at < db_now(session) - older_than)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def registered_nodes(session: Session, ttl_s: float) -> list[RegisteredNode]:
    """Every registration, live or stale, by ``node_id``."""
    now = db_now(session)
    return [
        _row(found, now, ttl_s)
        for found in session.scalars(select(NodeRegistration).order_by(NodeRegistration.node_id))
    ]
