"""The node's place in its group, as the catalog tells it (what ``status`` and ``/metrics``
report): who runs the jobs and through which broker queues, how many jobs wait in each, which
node owns the timer lease and until when, and which nodes are registered.

Queued jobs are counted in the catalog, which decides what runs (the broker is only a
doorbell, and may hold copies of a task or have lost some); a job's queue is its model's
device class (``pacs_node.queue`` in the bundle's metadata), as the node publishes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.catalog import leases, nodes
from pacs_node.catalog.clock import db_now
from pacs_node.catalog.models import Job, JobState
from pacs_node.config import Settings
from pacs_node.cpus import job_workers
from pacs_node.inference.registry import declared_queue
from pacs_node.services.timeline import JsonValue

# a query parameter whose name (or JSON-ish value, e.g. sentinel_kwargs) says it holds a secret
_SECRET = re.compile(r"pass|secret|token|key|auth", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with every secret replaced by ``***``: the password of each URL of a failover
    list (kombu: ``;``-separated), and the value of each query parameter that names or holds a
    secret. The user, hosts, ports and path stay; what cannot be taken apart is shown as
    ``scheme://host:port`` at most."""
    if not url:
        return ""
    return ";".join(_redact_one(part.strip()) for part in url.split(";"))


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # not a URL one can take apart: show none of it
        return "***"
    if not parts.scheme:
        return "***"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[-1]}"
    query = parts.query
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:  # in doubt: where it is, not how to get in
            return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
        query = "&".join(
            f"{name}={'***' if _SECRET.search(name) or _SECRET.search(value) else value}"
            for name, value in pairs
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


@dataclass(frozen=True, slots=True)
class JobQueueView:
    backend: str  # local | celery
    broker: str  # the broker URL, password redacted; "" for local
    workers: int  # local job workers of this node (celery: the workers are elsewhere)
    queued: dict[str, int]  # celery: broker queue name -> jobs queued in the catalog

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "backend": self.backend,
            "broker": self.broker,
            "workers": self.workers,
            "queues": dict(self.queued),
        }


@dataclass(frozen=True, slots=True)
class TimerLeaseView:
    owner_node_id: str  # "" when nobody took it yet
    owner: str  # <node id>/<pid>/<token>
    expires_at: datetime | None
    held: bool  # its expiry is still ahead (by the catalog's clock)
    this_node: str  # this configuration's node_id
    mine: bool  # held, by a process under this node_id

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "owner_node_id": self.owner_node_id if self.held else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "held": self.held,
            "this_node": self.this_node,
            "owned_by_this_node": self.mine,
        }


@dataclass(frozen=True, slots=True)
class GroupView:
    job_queue: JobQueueView
    timer_lease: TimerLeaseView
    nodes: list[nodes.RegisteredNode]

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "job_queue": self.job_queue.as_json(),
            "timer_lease": self.timer_lease.as_json(),
            "nodes": [
                {
                    "node_id": n.node_id,
                    "host": n.host,
                    "pid": n.pid,
                    "started_at": n.started_at.isoformat(),
                    "heartbeat_at": n.heartbeat_at.isoformat(),
                    "live": n.live,
                }
                for n in self.nodes
            ],
        }


def job_queue_view(session: Session, settings: Settings) -> JobQueueView:
    """The job-queue backend and, for Celery, the catalog's queued jobs per broker queue."""
    options = settings.node
    if options.job_queue != "celery":
        return JobQueueView("local", "", job_workers(options.job_workers)[0], {})
    queued = session.execute(
        select(Job.model, func.count(Job.id))
        .where(Job.state == JobState.QUEUED)
        .group_by(Job.model)
    ).all()
    per_queue: dict[str, int] = {}
    for model, n in queued:
        name = f"{options.job_queue_prefix}{declared_queue(options.models_dir, str(model))}"
        per_queue[name] = per_queue.get(name, 0) + int(n)
    return JobQueueView(
        "celery", redact_url(options.broker_url), 0, dict(sorted(per_queue.items()))
    )


def group_view(session: Session, settings: Settings) -> GroupView:
    """One reading of the group's state; raises when the catalog cannot be read."""
    options = settings.node
    me = options.node_name()
    found = leases.holder(session, leases.TIMERS)
    now = db_now(session)
    if found is None or not found[0]:
        lease = TimerLeaseView("", "", None, False, me, False)
    else:
        owner, expires = found
        held = expires > now
        owner_id = owner.split("/", 1)[0]
        lease = TimerLeaseView(owner_id, owner, expires, held, me, held and owner_id == me)
    return GroupView(
        job_queue_view(session, settings),
        lease,
        nodes.registered_nodes(session, options.timer_lease_s),
    )
