"""The running node: builds the stages from one Settings and starts and stops them in order.

Stopping. The first SIGTERM or SIGINT starts a graceful stop in the main thread: job workers
are asked to stop after their current job, the DICOM port closes and running associations get
half of ``stop_timeout_s`` to finish, what the SCP workers spooled is recorded, a job still
running near the deadline is handed back to the queue, then the outbox and the catalog close;
exit status 0. A second signal, or the stop outlasting ``stop_timeout_s``, kills every child
process and exits ``128 + signal`` at once; the catalog is then as after a SIGKILL, which the
next start repairs (jobs re-queued, deliveries taken back, spooled files recorded).
"""

from __future__ import annotations

import functools
import getpass
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pacs_node.assembly import Assembly
from pacs_node.audit import events as audit_events
from pacs_node.audit.syslog import SyslogForwarder, collector_from
from pacs_node.audit.trail import AuditTrail
from pacs_node.catalog.audit import study_object, study_source
from pacs_node.catalog.db import Catalog, open_catalog, sqlite_file
from pacs_node.config import NODE_FILE, PEERS_FILE, Settings
from pacs_node.datadir import make_private
from pacs_node.destinations import DimseDestination, missing_secrets, plain_http_destinations
from pacs_node.dispatch.dimse import recommitter
from pacs_node.dispatch.outbox import Outbox, node_id, process_gone
from pacs_node.doors import NodeParts, open_doors
from pacs_node.errors import ConfigError
from pacs_node.housekeeping import Housekeeping, finish_purges
from pacs_node.ingest.header import skip_value_validation
from pacs_node.ingest.receive import Receiver
from pacs_node.ingest.reconcile import reconcile
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.workers import SCPWorkers, drain_s
from pacs_node.jobs import JobQueue, open_job_queue
from pacs_node.lifecycle import SignalPipe, exit_now
from pacs_node.routing.router import Router, check_models
from pacs_node.timer_lease import TimerLease
from pacs_node.tls import TLSFileError, client_context

log = logging.getLogger(__name__)

RESERVE_S = 5.0  # at most this much of a stop is kept for what follows the job workers


def check_destination_tls(settings: Settings) -> None:
    """Every DICOM TLS destination's CA and client certificate load, or the node does not start."""
    for name, destination in settings.destinations.items():
        if not isinstance(destination, DimseDestination) or not destination.tls:
            continue
        try:
            client_context(destination.tls_files(), prefix=f"destinations.{name}.")
        except TLSFileError as exc:
            source = str((settings.config_dir or Path(".")) / PEERS_FILE)
            raise ConfigError(source, exc.key, exc.reason) from exc


class Node:
    def __init__(self, settings: Settings) -> None:
        skip_value_validation()  # the spool is read here too: reconcile, routing
        options = settings.node
        self.settings = settings
        make_private(options.data_dir, sqlite_file(options.catalog_url))
        self.catalog: Catalog = open_catalog(options.catalog_url)
        self.spool = Spool(
            options.spool_dir,
            fsync=options.fsync,
            min_free_bytes=options.min_free_mb * 2**20,
            node_id=options.node_name(),
            sync_threads=options.max_associations,
        )
        self.recorder = CatalogRecorder(self.catalog, self.spool)
        self.audit = AuditTrail(self.catalog, options.ae_title)
        collector = collector_from(
            options.audit_syslog_host,
            options.audit_syslog_port,
            options.audit_syslog_ca_file,
            options.audit_syslog_cert_file,
            options.audit_syslog_key_file,
        )
        try:
            self.syslog = SyslogForwarder(self.catalog, collector) if collector else None
        except TLSFileError as exc:
            source = str((settings.config_dir or Path(".")) / NODE_FILE)
            raise ConfigError(source, exc.key, exc.reason) from exc
        if self.syslog is not None:
            self.audit.listeners.append(self.syslog.wake)
        # Nodes sharing the catalog: one at a time marks stable, routes and purges.
        self.lease = TimerLease(
            self.catalog,
            node_id(settings),
            options.timer_lease_s,
            gone=process_gone,
            on_fenced=self._fenced,
        )
        self.assembly = Assembly(self.catalog, settings, self.lease)
        self.recorder.add_listener(self.assembly.on_touched)
        check_models(settings)
        self.router = Router(self.catalog, self.spool, settings.routes, self.lease)
        self.lease.add_listener(self.assembly.sweep)
        self.lease.add_listener(self.router.catch_up)
        self.assembly.add_sweep_listener(self.router.catch_up)
        self.assembly.add_listener(self.router.on_stable)
        self.assembly.add_listener(self._audit_study_received)  # after routing: never delays it
        for name, env in missing_secrets(settings.destinations):
            source = str((settings.config_dir or Path(".")) / PEERS_FILE)
            raise ConfigError(source, f"destinations.{name}.auth", f"${env} is not set")
        check_destination_tls(settings)
        clear = plain_http_destinations(settings.destinations)
        if clear:
            log.warning(
                "results go to these destinations over plain http, unencrypted",
                extra={"destinations": ",".join(clear)},
            )
        self.jobs: JobQueue = open_job_queue(self.catalog, settings)
        self.router.add_listener(self.jobs.submitted)
        self.outbox = Outbox(self.catalog, settings)
        self.housekeeping = Housekeeping(
            self.catalog,
            settings,
            recommit=recommitter(options.ae_title, self.outbox.resolve),
            lease=self.lease,
        )
        self.scp: StorageSCP | SCPWorkers
        if options.dicom_workers > 0:
            self.scp = SCPWorkers(
                settings,
                self.recorder,
                options.dicom_workers,
                on_worker_death=lambda since: reconcile(self.spool, self.recorder, since=since),
                auditor=self.audit.take,
                on_step=self.assembly.on_step,
            )
        else:
            self.scp = StorageSCP(
                settings,
                self.spool,
                self.recorder,
                self.catalog,
                auditor=self.audit.take,
                on_step=self.assembly.on_step,
            )
        self.receiver = Receiver(settings, self.spool, self.recorder, self.catalog)
        readiness = {
            "storage scp": self.scp.alive,
            "recorder": self.recorder.alive,
            "job workers": self._job_workers_alive,
            "audit trail": self.audit.alive,
            "node registration": self.lease.registered,
        }
        if self.syslog is not None:
            readiness["audit syslog"] = self.syslog.alive
        # Bound here, so a port in use fails the start before anything runs.
        self.doors = open_doors(
            NodeParts(settings, self.catalog, self.spool, self.receiver, self.audit, readiness)
        )
        self._ending = threading.Lock()  # the graceful end and the forced one exclude each other
        self._exit_code: int | None = None  # set once the graceful stop is over
        self._stopped = False

    def _audit_study_received(self, study_uid: str) -> None:
        """Assembly listener: a study became stable; audit its receipt (110104, C) once per
        stability (a study that reopens and settles again is audited again)."""
        try:
            with self.catalog.sessions() as session:
                study = study_object(session, study_uid)
                source = study_source(session, study_uid)
        except Exception as exc:  # auditing never stops the assembly's other listeners
            log.error(
                "study not audited", extra={"study_uid": study_uid, "error": type(exc).__name__}
            )
            return
        if study is not None:
            self.audit.record(
                audit_events.study_received(self.settings.node.ae_title, source, study)
            )

    def _fenced(self) -> None:
        """Another process took this node's registration over (this one's heartbeat went
        stale: the catalog unreachable, the process frozen): stop as on SIGTERM, and exit
        non-zero so that a supervisor starts it again (refused while the other one runs)."""
        log.error("stopping: this node's registration belongs to another process now")
        os.kill(os.getpid(), signal.SIGTERM)

    def _job_workers_alive(self) -> bool:
        health = self.jobs.health()
        return health.alive >= health.workers and health.broker_reachable is not False

    def start(self) -> None:
        """Register this node, reconcile the catalog with the spool, rebuild timers, then open
        the DICOM port."""
        # First: a second process under this node_id would take this one's lease, claims and
        # partial files for leftovers of its own.
        self._register()
        # Removals a crash cut short are finished first, so reconcile never brings them back.
        self.audit.start()
        if self.syslog is not None:
            self.syslog.start()
        finish_purges(self.catalog, self.spool.root, self.settings.node.data_dir / "results")
        live = {n.node_id for n in self.lease.nodes() if n.live and n.node_id != self.lease.node_id}
        recovered = reconcile(
            self.spool, self.recorder, live=live, older_than_s=self.settings.node.timer_lease_s
        )
        self.lease.start()
        self.router.catch_up()
        self.recorder.start()
        self.assembly.start()
        self.jobs.start()  # re-queues jobs a dead process left running
        self.outbox.start()  # re-sends deliveries cut off mid-send
        self.housekeeping.start()
        self.scp.start()
        try:
            for door in self.doors:
                door.start()
        except BaseException:
            self.stop()  # the SCP and the workers run already: no process is left behind
            raise
        self.audit.record(
            audit_events.application_activity(
                self.settings.node.ae_title, start=True, launcher=_launcher()
            )
        )
        log.info(
            "node started",
            extra={"catalog": self.catalog.url, "recovered_instances": recovered},
        )

    def _register(self) -> None:
        """Refuse to start under a ``node_id`` another live node of the catalog holds."""
        held = self.lease.register()
        if held is None:
            return
        source = str((self.settings.config_dir or Path(".")) / NODE_FILE)
        named = "node_id" if self.settings.node.node_id else "node_id (unset: host and data_dir)"
        self.catalog.dispose()
        raise ConfigError(
            source,
            "node_id",
            f"{named} {self.lease.node_id!r} is in use by a running node (host {held.host},"
            f" pid {held.pid}, started {held.started_at:%Y-%m-%d %H:%M:%S} UTC, heartbeat"
            f" within timer_lease_s): give each node of a group its own node_id",
        )

    def run(self, signals: SignalPipe) -> int:
        """Serve until SIGTERM or SIGINT, then stop gracefully in this (the main) thread.

        A second signal, or the stop still running after ``stop_timeout_s``, stops the node at
        once from another thread (:meth:`stop_now`), whatever this one is waiting for. Returns
        the exit status of a graceful stop: 0, or 1 when a step of it failed."""
        signum = signals.next()
        if signum is None:  # pragma: no cover - next() without a timeout always returns one
            return 1
        started = time.monotonic()
        timeout = self.settings.node.stop_timeout_s
        log.info("stopping", extra={"signal": signal.Signals(signum).name, "timeout_s": timeout})
        threading.Thread(
            target=self._escalate,
            args=(signals, signum, started),
            name="stop-deadline",
            daemon=True,
        ).start()
        failed = self.stop(started + timeout)
        with self._ending:
            self._exit_code = 1 if failed or self.lease.fenced.is_set() else 0
            log.info(
                "stopped",
                extra={
                    "seconds": round(time.monotonic() - started, 2),
                    "exit_code": self._exit_code,
                },
            )
        return self._exit_code

    def _escalate(self, signals: SignalPipe, signum: int, started: float) -> None:
        deadline = started + self.settings.node.stop_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "stop_timeout_s passed"
                break
            if signals.next(remaining) is not None:
                reason = "second signal"
                break
        with self._ending:
            if self._exit_code is None:
                self.stop_now(reason, signum, started)
            # The stop is over, but the interpreter has not exited by the deadline.
            log.warning("exit held up; leaving now", extra={"reason": reason})
            exit_now(self._exit_code)

    def stop_now(self, reason: str, signum: int, started: float) -> NoReturn:
        """Kill every child process and exit ``128 + signum`` at once, waiting for nothing
        the main thread may hold. The catalog stays consistent as after a SIGKILL: at the next
        start, jobs left running are re-queued, deliveries left sending are taken back, and
        spooled instances without a row are recorded."""
        log.warning(
            "stopping now",
            extra={"reason": reason, "seconds": round(time.monotonic() - started, 2)},
        )
        self.jobs.kill_now()
        if isinstance(self.scp, SCPWorkers):
            self.scp.kill_now()
        code = 128 + signum
        log.warning(
            "stopped",
            extra={
                "seconds": round(time.monotonic() - started, 2),
                "exit_code": code,
                "forced": True,
            },
        )
        exit_now(code)

    def stop(self, deadline: float | None = None) -> bool:
        """Stop every stage in order by ``deadline`` (``time.monotonic()``; default: now plus
        ``stop_timeout_s``). Job workers are asked first, so they finish their job while the
        SCP drains its associations. Returns True when a step failed (the others still ran)."""
        if self._stopped:
            return False
        self._stopped = True
        started = time.monotonic()
        timeout = self.settings.node.stop_timeout_s
        if deadline is None:
            deadline = started + timeout
        # What is left after the job workers' share: re-queueing, the outbox, the catalog.
        workers_deadline = deadline - min(RESERVE_S, timeout / 5)
        scp_deadline = min(started + drain_s(self.settings) + timeout / 10, workers_deadline)
        failed = False

        def step(name: str, action: Callable[[], object]) -> object:
            nonlocal failed
            try:
                return action()
            except Exception:  # one stage failing to stop must not keep the others running
                log.exception("stopping a stage failed", extra={"stage": name})
                failed = True
                return None

        for door in self.doors:  # no new requests; those under way get a few seconds
            step("web", functools.partial(door.stop, max(0.1, min(5.0, timeout / 5))))
        step("job workers", self.jobs.request_stop)
        step("outbox", self.outbox.request_stop)  # no new batch; the sends under way go on
        scp = self.scp
        if isinstance(scp, SCPWorkers):
            killed = step("scp", lambda: scp.stop(scp_deadline))
        else:
            killed = step("scp", scp.stop)
        step("recorder", lambda: self.recorder.stop(max(0.1, workers_deadline - time.monotonic())))
        log.info(
            "scp closed",
            extra={"seconds": round(time.monotonic() - started, 2), "killed": killed or 0},
        )
        step("assembly", self.assembly.stop)
        step("housekeeping", self.housekeeping.stop)
        step("timer lease", self.lease.stop)  # handed over now, not when it expires
        counts = step("job workers", lambda: self.jobs.stop(workers_deadline))
        stopped, killed = counts if isinstance(counts, tuple) else (0, 0)
        log.info(
            "job workers stopped",
            extra={
                "seconds": round(time.monotonic() - started, 2),
                "stopped": stopped,
                "killed_and_requeued": killed,
            },
        )
        sending = step("outbox", lambda: self.outbox.stop(deadline - min(1.0, timeout / 10)))
        if sending:
            log.warning(
                "deliveries still sending at the stop deadline; sent again after the restart",
                extra={"deliveries": sending},
            )
        self.audit.record(
            audit_events.application_activity(
                self.settings.node.ae_title, start=False, launcher=_launcher()
            )
        )
        step("audit trail", lambda: self.audit.stop(max(0.5, deadline - time.monotonic() - 1)))
        syslog = self.syslog
        if syslog is not None:
            step(
                "audit syslog", lambda: syslog.stop(max(0.5, min(3.0, deadline - time.monotonic())))
            )
        step("catalog", self.catalog.dispose)
        return failed


def _launcher() -> str | None:
    """The operating-system user who started the node (the Application Launcher)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None
