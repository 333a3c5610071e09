"""``pacs-node worker``: a Celery worker that runs the node's jobs with the same pipeline
function as the local pool (:func:`pacs_node.worker.run_job`).

Each task names one job. The worker process claims it in the catalog with a lease
(:func:`~pacs_node.catalog.jobs.claim_job_id`); a delivery that finds the job already claimed,
done or cancelled is acknowledged without running anything. While the job runs, a heartbeat
thread renews the lease every third of ``job_lease_s``; a worker killed mid-job stops renewing,
and the node's sweeper (:mod:`.celery_queue`) hands the job to another worker once the lease
runs out. A job that raises fails in the catalog like any other, and its task is
acknowledged: whether a job runs again is the catalog's business, never the broker's.

Concurrency 1 runs tasks in the worker process itself (Celery's solo pool); more starts that
many prefork processes. Each process opens its own catalog connection and model runner on its
first task, after the fork. SIGTERM stops the worker after its running tasks.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import claim_job_id, renew_lease
from pacs_node.config import Settings
from pacs_node.jobs.celery_app import TASK_NAME, broker_queue, make_app
from pacs_node.worker import make_runner, run_job, worker_id

if TYPE_CHECKING:
    from pacs_node.inference.runner import Runner

log = logging.getLogger(__name__)

SKIPPED = "skipped"  # what a task returns when its job was not queued any more


@dataclass
class _Process:
    """What one worker process keeps between tasks: its catalog connection, and its model
    runner once a job needed it."""

    pid: int
    catalog: Catalog
    runner: Runner | None = None


@dataclass
class _State:
    """The worker's settings (set before Celery starts, inherited by forked processes) and
    this process's resources."""

    settings: Settings | None = None
    process: _Process | None = None


_state = _State()
_claims = itertools.count(1)


def _resources(settings: Settings) -> _Process:
    """This process's catalog, opened on its first task (never inherited across a fork: a
    database connection must not be shared by two processes)."""
    process = _state.process
    if process is None or process.pid != os.getpid():
        process = _state.process = _Process(
            pid=os.getpid(),
            catalog=open_catalog(settings.node.catalog_url, run_migrations=False),
        )
    return process


class Heartbeat:
    """Renews a claimed job's lease every third of it until stopped."""

    def __init__(self, catalog: Catalog, job_id: int, worker: str, lease_s: float) -> None:
        self.catalog, self.job_id, self.worker, self.lease_s = catalog, job_id, worker, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)
        self.lost = False  # the lease went to someone else: this run's results are discarded

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self.catalog.sessions.begin() as session:
                    if not renew_lease(session, self.job_id, self.worker, self.lease_s):
                        self.lost = True
                        return  # cancelled, or re-queued after a stall: the job notices itself
            except SQLAlchemyError:
                log.exception("lease not renewed; trying again", extra={"job_id": self.job_id})

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_task(job_id: int) -> str:
    """The task: claim the job, run it under a heartbeat; the state it ended in."""
    settings = _state.settings
    if settings is None:  # pragma: no cover - start_worker sets it before any task
        raise RuntimeError("the worker's settings are not loaded")
    process = _resources(settings)
    me = worker_id(f"celery{next(_claims)}")
    lease_s = settings.node.job_lease_s
    with process.catalog.sessions.begin() as session:
        claimed = claim_job_id(session, int(job_id), me, lease_s)
    if not claimed:
        log.info("job not queued any more; task acknowledged", extra={"job_id": job_id})
        return SKIPPED
    with Heartbeat(process.catalog, job_id, me, lease_s):
        if process.runner is None:  # after the claim: a redelivery never waits for torch
            process.runner = make_runner(settings)
        state = run_job(process.catalog, settings, process.runner, job_id, me)
    return str(state)


def start_worker(settings: Settings, queues: list[str], concurrency: int) -> int:
    """Run a Celery worker on ``queues`` (device classes) until it is stopped; its exit
    status."""
    _state.settings = settings
    options = settings.node
    app = make_app(options)
    app.task(name=TASK_NAME, ignore_result=True)(run_task)
    declared = [broker_queue(options, name) for name in queues]
    app.conf.task_queues = declared
    worker = app.Worker(
        queues=[q.name for q in declared],
        concurrency=concurrency,
        pool="solo" if concurrency == 1 else "prefork",
        hostname=f"pacs-node-{os.getpid()}@{socket.gethostname()}",
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
        loglevel=options.log_level,
    )
    log.info(
        "job worker started",
        extra={"queues": ",".join(q.name for q in declared), "concurrency": concurrency},
    )
    worker.start()
    return int(worker.exitcode or 0)
