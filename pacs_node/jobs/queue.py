"""The seam between the node and whatever runs its jobs.

The catalog is the queue: a job is a row in state ``queued`` (whoever queued it), and a
runner takes it with a compare-and-set claim (:mod:`pacs_node.catalog.jobs`), runs it with
:func:`pacs_node.worker.run_job` and records how it ended. A :class:`JobQueue` is what takes
jobs from that queue: worker processes of this node (:mod:`.local`, ``job_queue: local``), or
Celery workers on any host fed through a broker (:mod:`.celery_queue`, ``job_queue: celery``);
the node talks only to this seam and runs the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class QueueHealth:
    """What the runner of jobs can say about itself."""

    backend: str  # "local" | "celery"
    workers: int  # how many it should have (celery: 0, they are not the node's)
    alive: int  # how many run now
    restarts: int  # workers started again since the node started
    stopping: bool
    broker_reachable: bool | None = None  # celery: at the last publish or check; None: no broker


class JobQueue(Protocol):
    """Runs the catalog's queued jobs. Started after the catalog is reconciled, stopped
    first; a stop never fails a job (one cut off goes back to the queue)."""

    def start(self) -> None:
        """Put back in the queue what a dead process of this host left running, then start
        taking jobs."""

    def submitted(self, job_id: int) -> None:
        """A job was queued: take it as soon as there is room (one that polls the catalog
        finds it anyway)."""

    def request_stop(self) -> None:
        """Take no new job; the ones running go on."""

    def stop(self, deadline: float) -> tuple[int, int]:
        """Wait for running jobs until ``deadline`` (``time.monotonic()``), then cut off and
        re-queue those still running. Returns (workers stopped, workers killed)."""

    def kill_now(self) -> None:
        """Cut off every running job at once, waiting for nothing; the next start re-queues
        them."""

    def health(self) -> QueueHealth: ...
