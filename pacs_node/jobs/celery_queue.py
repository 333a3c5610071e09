"""Jobs run by Celery workers (``job_queue: celery``): the node publishes, ``pacs-node worker``
processes on any host run them (:mod:`.celery_worker`).

The catalog stays the queue. A queued job is handed to the broker as a task naming its id, on
the queue of its model's device class; the worker that receives it claims exactly that job
with a compare-and-set that also sets a lease (``job_lease_s``), renews the lease every third
of it while the job runs, and records the outcome in the catalog, so a task delivered twice
runs once (the second finds the job claimed or over and runs nothing).

A sweeper thread in every node repairs what the broker and dead workers leave:

- a running job whose lease ran out (its worker was SIGKILLed, lost its host or its catalog)
  goes back to the queue (failed after ``job_max_attempts`` claims) and is published again;
- a queued job handed over ``job_lease_s`` ago and still not claimed (the broker lost it in a
  restart without persistence, or the publish failed) is published again; each further time
  it waits twice as long (at most 16 times), since a job may also just wait behind a backlog;
- a broker that lost its tasks (Redis: its ``run_id`` changed, it restarted, and without
  persistence that loses every task; RabbitMQ: a queue the node published to is gone, its
  data was wiped) gets every queued job handed over again at once, not after its backoff.

It wakes when the node queues a job (:meth:`CeleryJobQueue.submitted`) and at least every
:data:`SWEEP_MAX_S`. Several nodes on one catalog each sweep: every step is a compare-and-set,
so a job is re-queued once and handed over once per interval. A duplicate task costs one
claim that fails. Jobs queued by another process (``pacs-node jobs retry``) are published by
the next sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kombu import Queue
from kombu.exceptions import ChannelError
from sqlalchemy.exc import SQLAlchemyError

from pacs_node.catalog.db import Catalog, sqlite_file
from pacs_node.catalog.jobs import (
    forget_published,
    requeue_expired,
    requeue_orphans,
    take_unpublished,
    unpublish,
)
from pacs_node.config import Settings
from pacs_node.errors import PacsNodeError
from pacs_node.inference.queues import DEFAULT_QUEUE
from pacs_node.inference.registry import Registry
from pacs_node.jobs.celery_app import TASK_NAME, broker_queue, is_amqp, make_app
from pacs_node.jobs.queue import QueueHealth
from pacs_node.worker import host_prefix

log = logging.getLogger(__name__)

SWEEP_MAX_S = 5.0  # the longest a sweep waits; a third of the lease when that is shorter
PROBE_S = 15.0  # how often an idle node checks that the broker answers


class CeleryJobQueue:
    """Publishes the catalog's queued jobs to a Celery broker and sweeps up lost ones."""

    backend = "celery"

    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        self.catalog = catalog
        self.options = settings.node
        self.app = make_app(self.options)
        self.registry = Registry(self.options.models_dir, self.options.model_sha256_allowlist)
        self.sweep_s = min(SWEEP_MAX_S, self.options.job_lease_s / 3)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reachable: bool | None = None  # None: not tried yet
        self._probed = 0.0
        self._instance: str | None = None  # the broker's run id at the last probe
        self._published_to: dict[str, Queue] = {}  # RabbitMQ queues this node handed tasks to

    def start(self) -> None:
        """Jobs this host's local workers left running (the node ran with ``job_queue: local``
        before) go back to the queue; then the sweeper starts."""
        with self.catalog.sessions.begin() as session:
            requeue_orphans(session, host_prefix(), self.options.job_max_attempts)
        if sqlite_file(self.catalog.url) is not None:
            log.warning("the catalog is a SQLite file: Celery workers must run on this host")
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)
        self._thread.start()
        log.info("jobs go to Celery workers", extra={"queue_prefix": self.options.job_queue_prefix})

    def submitted(self, job_id: int) -> None:
        """Wake the sweeper, which publishes the new job at once."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.sweep()
            except SQLAlchemyError:  # the catalog is away for a moment
                log.exception("catalog unavailable; the job sweeper tries again")
            self._wake.wait(self.sweep_s)

    def sweep(self) -> tuple[int, int]:
        """One pass: re-queue expired leases, publish what is due. Returns (re-queued,
        published)."""
        with self.catalog.sessions.begin() as session:
            requeued, failed = requeue_expired(session, self.options.job_max_attempts)
        if requeued or failed:
            log.warning(
                "jobs of lost workers recovered", extra={"requeued": requeued, "failed": failed}
            )
        with self.catalog.sessions.begin() as session:
            due = take_unpublished(session, self.options.job_lease_s)
        refused: list[int] = []
        for index, (job_id, model) in enumerate(due):
            if not self.publish(job_id, model):  # the broker is away: the rest wait with this one
                refused = [job_id for job_id, _ in due[index:]]
                break
        if refused:
            with self.catalog.sessions.begin() as session:
                unpublish(session, refused)
        if not due and time.monotonic() - self._probed > PROBE_S:
            self.probe()
        return requeued, len(due) - len(refused)

    def device_class(self, model: str) -> str:
        try:
            return self.registry.get(model).queue
        except PacsNodeError:  # removed since the job was queued: its claim fails it
            return DEFAULT_QUEUE

    def publish(self, job_id: int, model: str) -> bool:
        """Hand one job to the broker; False when the broker did not take it."""
        queue = broker_queue(self.options, self.device_class(model))
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id],
                queue=queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu and redis raise many kinds: the sweeper tries again
            self._set_reachable(False, exc)
            return False
        self._set_reachable(True)
        self._published_to[queue.name] = queue
        log.info("job published", extra={"job_id": job_id, "queue": queue.name})
        return True

    def probe(self) -> bool:
        """Whether the broker answers now."""
        self._probed = time.monotonic()
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1)
                instance = self.broker_instance(connection)
        except Exception as exc:
            self._set_reachable(False, exc)
            return False
        self._set_reachable(True)
        self._restarted(instance)
        return True

    def broker_instance(self, connection: Any) -> str | None:
        """What names this run of the broker (Redis: ``INFO server`` run_id, new at each
        start; RabbitMQ, which keeps durable queues and persistent tasks across restarts: a
        new name whenever a queue this node published to is missing); None where it cannot
        be told."""
        if is_amqp(self.options):
            lost = []
            for name, queue in sorted(self._published_to.items()):
                with connection.channel() as channel:
                    try:
                        channel.queue_declare(queue=name, passive=True)
                    except ChannelError:  # NOT_FOUND: the broker lost the queue and its tasks
                        lost.append(queue)
            for queue in lost:  # declared again now: a publisher may think it still exists
                with connection.channel() as channel:
                    queue(channel).declare()
            if lost:
                return f"lost {lost[0].name} at {time.time()}"
            return self._instance or "amqp"
        info = connection.default_channel.client.info("server")
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return str(run_id) if run_id else None

    def _restarted(self, instance: str | None) -> None:
        """A broker that restarted since the last probe: hand every queued job over again."""
        before, self._instance = self._instance, instance
        if before is None or instance is None or before == instance:
            return
        with self.catalog.sessions.begin() as session:
            again = forget_published(session)
        log.warning("job broker restarted; queued jobs handed over again", extra={"jobs": again})
        self._wake.set()

    def _set_reachable(self, reachable: bool, exc: Exception | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("job broker reachable")
            else:
                log.error(
                    "job broker unreachable; queued jobs wait in the catalog",
                    extra={"error": type(exc).__name__ if exc else ""},
                )
        self.reachable = reachable

    def request_stop(self) -> None:
        """The broker's workers are not ours to stop; the sweeper stops with the node."""

    def stop(self, deadline: float) -> tuple[int, int]:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        return 0, 0

    def kill_now(self) -> None:
        self._stop.set()
        self._wake.set()

    def health(self) -> QueueHealth:
        return QueueHealth(
            backend=self.backend,
            workers=0,  # they run elsewhere; the broker knows them, the node does not
            alive=0,
            restarts=0,
            stopping=self._stop.is_set(),
            broker_reachable=self.reachable,
        )
