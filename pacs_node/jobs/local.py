"""Jobs run by worker processes of this node, the first :class:`~.queue.JobQueue`.

Inference takes the cores for seconds and building results holds the GIL in pure Python
(highdicom, matplotlib), so jobs run in worker *processes* (``job_workers``), started with
``spawn``: the main process, which records received instances and runs assembly and the
outbox, never imports torch and stays responsive while a model runs. Each worker's torch
threads are its share of the cores (``torch_threads: 0``, :mod:`pacs_node.cpus`): two workers
with one thread each on two cores overlap one job's decoding and result building with the
other's inference, and never run four busy threads on two cores. Workers share nothing but
the catalog; claims are compare-and-set, so any number of them, in any number of nodes, never
take the same job.

A job whose worker died (SIGKILL, OOM) is ``running`` in the catalog with that worker's id;
:meth:`LocalJobQueue.start` puts such jobs of this host back in the queue, and fails the ones
that already took ``job_max_attempts`` workers down. A dead worker is replaced (see
:mod:`pacs_node.supervisor`) and the job it held goes back to the queue. A stopping node asks
each worker to stop after its current job (SIGTERM does the same); one still busy at the
node's deadline is killed and its job re-queued (a stop never fails a job).
"""

from __future__ import annotations

import logging
import os
from multiprocessing.connection import Connection

from sqlalchemy.exc import SQLAlchemyError

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.jobs import claim_job, requeue_orphans
from pacs_node.config import Settings
from pacs_node.cpus import job_workers, too_many_workers
from pacs_node.jobs.queue import QueueHealth
from pacs_node.lifecycle import exit_now
from pacs_node.supervisor import Child, NodeLink, Supervisor
from pacs_node.worker import host_prefix, make_runner, run_job, worker_id

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often an idle worker looks for a queued job
SUPERVISE_S = 1.0  # how often the pool looks for a dead worker to replace


def _node_gone() -> None:
    """A SIGKILLed node must not leave a worker running a job that the restarted node hands
    to a new worker."""
    os._exit(1)


def worker_main(settings: Settings, index: int, control: Connection) -> None:
    """A worker process: claim, run, repeat; idle polls every ``POLL_S``. The node's request
    or a SIGTERM stops it after its current job; SIGINT is the node's to act on, not ours."""
    link = NodeLink(control, on_gone=_node_gone)
    from pacs_node.logs import configure_node_logging

    configure_node_logging(settings.node)
    stop = link.stopping
    catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
    runner = make_runner(settings, workers=settings.node.job_workers or 1)  # sized by the pool
    me = worker_id(f"w{index}")
    log.info("job worker started", extra={"worker": me, **runner.pools()})
    try:
        while not stop.is_set():
            try:
                with catalog.sessions.begin() as session:
                    job_id = claim_job(session, me)
                if job_id is None:
                    stop.wait(POLL_S)
                    continue
                run_job(catalog, settings, runner, job_id, me)
            except SQLAlchemyError:  # the catalog is away for a moment: the job stays running
                log.exception("catalog unavailable; the worker tries again", extra={"worker": me})
                stop.wait(POLL_S * 10)
    finally:
        catalog.dispose()
    log.info("job worker stopped", extra={"worker": me})
    exit_now(0)  # its last job is in the catalog


class LocalJobQueue:
    """``job_workers`` worker processes on this host, polling the catalog for queued jobs."""

    backend = "local"

    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        self.catalog = catalog
        self.size, reason = job_workers(settings.node.job_workers)
        # the children get the count itself: "auto" sized once, here, so their thread shares
        # follow the pool's size, not the memory free when each of them starts
        settings = settings.model_copy(
            update={"node": settings.node.model_copy(update={"job_workers": self.size})}
        )
        self.settings = settings
        log.info("job workers sized", extra={"workers": self.size, "reason": reason})
        crowded = too_many_workers(self.size)
        if crowded is not None:
            log.warning(crowded)
        self.children = Supervisor(
            "job worker",
            self.size,
            worker_main,
            lambda index: (settings, index),
            process_name="pacs-node-job-worker-{slot}",
            died=self._requeue_dead,
            poll_s=SUPERVISE_S,
        )

    def recover(self) -> tuple[int, int]:
        """Jobs this host left running when it died: back to the queue (or failed)."""
        with self.catalog.sessions.begin() as session:
            queued, failed = requeue_orphans(
                session, host_prefix(), self.settings.node.job_max_attempts
            )
        if queued or failed:
            log.info("interrupted jobs recovered", extra={"requeued": queued, "failed": failed})
        return queued, failed

    def start(self) -> None:
        self.recover()
        self.children.start()

    def submitted(self, job_id: int) -> None:
        """Nothing to do: an idle worker finds the job within ``POLL_S``."""

    def _requeue_dead(self, child: Child) -> None:
        """The job of a dead worker back to the queue (or failed), before its replacement."""
        with self.catalog.sessions.begin() as session:
            queued, failed = requeue_orphans(
                session,
                f"{host_prefix()}{child.process.pid}:",
                self.settings.node.job_max_attempts,
                by="worker replaced",
            )
        log.error(
            "job worker died; replacing it",
            extra={
                "worker": child.slot,
                "exitcode": child.process.exitcode,
                "requeued": queued,
                "failed": failed,
            },
        )

    def replace_dead(self) -> int:
        return self.children.replace_dead()

    def request_stop(self) -> None:
        self.children.request_stop()

    def stop(self, deadline: float) -> tuple[int, int]:
        total = len(self.children.processes)
        killed = self.children.stop(deadline)
        for process in killed:
            with self.catalog.sessions.begin() as session:
                requeue_orphans(
                    session,
                    f"{host_prefix()}{process.pid}:",
                    self.settings.node.job_max_attempts,
                    by="node stopping",
                    stopped=True,
                )
        return total - len(killed), len(killed)

    def kill_now(self) -> None:
        self.children.kill_now()

    def health(self) -> QueueHealth:
        return QueueHealth(
            backend=self.backend,
            workers=self.size,
            alive=self.children.alive,
            restarts=self.children.restarts,
            stopping=self.children.stopping,
        )
