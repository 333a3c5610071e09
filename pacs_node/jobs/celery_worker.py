"""``pacs-node worker``: a Celery worker that runs the node's jobs with the same pipeline
function as the local pool (:func:`pacs_node.worker.run_job`).

Each task names one job. The worker process claims it in the catalog with a lease
(:func:`~pacs_node.catalog.jobs.claim_job_id`); a delivery that finds the job already claimed,
done or cancelled is acknowledged without running anything. While the job runs, a heartbeat
thread renews the lease every third of ``job_lease_s``; a worker killed mid-job stops renewing,
and the node's sweeper (:mod:`.celery_queue`) hands the job to another worker once the lease
runs out. A run past ``job_timeout_s`` loses its claim the same way (re-queued, or failed after
``job_max_attempts``) and stops at its next stage. A job that raises fails in the catalog like
any other, and its task is acknowledged: whether a job runs again is the catalog's business,
never the broker's. Before the claim it is the broker's: a task whose claim could not be tried
(the catalog is away) is rejected back to its queue, never acknowledged.

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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery.exceptions import Reject
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import claim_job_id, renew_lease, time_out_job
from pacs_node.config import Settings
from pacs_node.cpus import too_many_workers
from pacs_node.errors import CatalogError
from pacs_node.jobs.celery_app import TASK_NAME, broker_queue, is_amqp, make_app
from pacs_node.worker import make_runner, run_job, worker_id

if TYPE_CHECKING:
    from pacs_node.inference.runner import Runner

log = logging.getLogger(__name__)

SKIPPED = "skipped"  # what a task returns when its job was not queued any more
REJECT_PAUSE_S = 2.0  # a worker whose catalog is away hands tasks back at most this often


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
    concurrency: int = 1  # processes sharing the cores: each runner's torch threads a share
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
    """Renews a claimed job's lease every third of it until stopped; past ``timeout_s`` it
    ends the claim instead (:func:`~pacs_node.catalog.jobs.time_out_job`)."""

    def __init__(
        self,
        catalog: Catalog,
        job_id: int,
        worker: str,
        lease_s: float,
        timeout_s: float | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.catalog, self.job_id, self.worker, self.lease_s = catalog, job_id, worker, lease_s
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)
        # the claim ended under the run (cancelled, re-queued, timed out): its stage updates
        # fail from now on, so it stops at the next one and its results are discarded
        self.lost = False
        self._deadline = float("inf")

    def _wait(self) -> bool:
        """Sleep until the next renewal or the timeout; True when stopped meanwhile."""
        left = self._deadline - time.monotonic()
        # past the deadline (a time-out the catalog did not take): retried every third
        return self._stop.wait(min(self.lease_s / 3, left) if left > 0 else self.lease_s / 3)

    def _run(self) -> None:
        while not self._wait():
            try:
                with self.catalog.sessions.begin() as session:
                    if time.monotonic() >= self._deadline:
                        time_out_job(
                            session,
                            self.job_id,
                            self.worker,
                            self.timeout_s or 0,
                            self.max_attempts,
                        )
                        self.lost = True
                        log.warning("job timed out", extra={"job_id": self.job_id})
                        return
                    if not renew_lease(session, self.job_id, self.worker, self.lease_s):
                        self.lost = True
                        return
            except SQLAlchemyError:
                log.exception("lease not renewed; trying again", extra={"job_id": self.job_id})

    def __enter__(self) -> Heartbeat:
        if self.timeout_s is not None:
            self._deadline = time.monotonic() + self.timeout_s
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _claim(settings: Settings, job_id: int, me: str) -> tuple[_Process, int | None]:
    """This process's resources and the claim's attempt (None: not queued any more). A
    catalog that cannot be asked hands the task back to the broker: acknowledged, it would be
    lost until the sweeper publishes the job again, many intervals later."""
    try:
        process = _resources(settings)
        with process.catalog.sessions.begin() as session:
            return process, claim_job_id(session, job_id, me, settings.node.job_lease_s)
    except (SQLAlchemyError, CatalogError) as exc:
        log.error(
            "catalog unavailable; task handed back to the broker",
            extra={"job_id": job_id, "error": type(exc).__name__},
        )
        time.sleep(REJECT_PAUSE_S)  # the catalog is away: do not spin through the queue
        raise Reject(type(exc).__name__, requeue=True) from exc


def run_task(job_id: int) -> str:
    """The task: claim the job, run it under a heartbeat; the state it ended in."""
    settings = _state.settings
    if settings is None:  # pragma: no cover - start_worker sets it before any task
        raise RuntimeError("the worker's settings are not loaded")
    me = worker_id(f"celery{next(_claims)}")
    process, attempt = _claim(settings, int(job_id), me)
    if attempt is None:
        log.info("job not queued any more; task acknowledged", extra={"job_id": job_id})
        return SKIPPED
    options = settings.node
    beat = Heartbeat(
        process.catalog,
        int(job_id),
        me,
        options.job_lease_s,
        timeout_s=options.job_timeout_s,
        max_attempts=options.job_max_attempts,
    )
    with beat:
        if process.runner is None:  # after the claim: a redelivery never waits for torch
            process.runner = make_runner(settings, workers=_state.concurrency)
        state = run_job(process.catalog, settings, process.runner, int(job_id), me, attempt)
    if beat.lost:
        log.warning("the job's claim ended before its run did", extra={"job_id": job_id})
    return str(state)


def check_catalog(settings: Settings) -> None:
    """Refuse to start on a catalog that cannot be reached or is not at this version's schema
    (a worker with no database_url would open an empty SQLite file and claim nothing, while
    acknowledging every task): a :class:`CatalogError` that says which."""
    try:
        catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
    except (ArgumentError, ValueError) as exc:  # its text never quotes the URL's password
        raise CatalogError(f"the catalog URL is not valid ({type(exc).__name__})") from exc
    catalog.dispose()


def start_worker(settings: Settings, queues: list[str], concurrency: int) -> int:
    """Run a Celery worker on ``queues`` (device classes) until it is stopped; its exit
    status."""
    check_catalog(settings)
    crowded = too_many_workers(concurrency)
    if crowded is not None:
        log.warning(crowded)
    _state.settings = settings
    _state.concurrency = concurrency
    options = settings.node
    app = make_app(options)
    if concurrency == 1 and is_amqp(options):
        # the solo pool runs a job in the consumer's own thread, which then sends no AMQP
        # heartbeats: the broker would drop the connection (and redeliver) under a long job
        app.conf.broker_heartbeat = 0
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
