"""Storage SCP worker processes sharing one listening socket.

pynetdicom decodes PDUs in Python, so one process handles about one core's worth of C-STOREs
whatever the number of associations (the GIL). The main process binds the DICOM port once and
spawns workers that accept on that same socket; each worker runs the ordinary
:class:`~pacs_node.ingest.scp.StorageSCP` (parse, spool with fsync, ack) and sends what it spooled
back over a pipe of its own (no lock shared between processes: a worker killed in the middle of
a write takes only its own pipe with it). The main process keeps the single catalog writer and
the assembly timers, so state stays in one place. Modality Performed Procedure Steps are the
one exception: their answer (duplicate, unknown, already ended) depends on the catalog, so a
worker writes those few rows itself and sends the study's UID over its pipe for assembly.
Workers are spawned (not forked) so they never inherit the main process's threads or database
connections, and a worker that dies is replaced (:mod:`pacs_node.supervisor`, as for job workers).

The DICOM TLS port, when configured, is bound the same way and served by every worker beside
the plain one; each worker does its own TLS handshakes (and certificate reloads), and reports
refused ones over its pipe to the node's audit trail (110113, Node Authentication).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from pacs_node.audit.events import Alert, AuditEvent
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.config import Settings
from pacs_node.ingest.limits import SharedLimits
from pacs_node.ingest.recorder import RecordSink
from pacs_node.ingest.scp import StorageSCP, bind_listening, limits_for, server_tls
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.transport import TLS_HANDSHAKE_COUNTER
from pacs_node.lifecycle import exit_now
from pacs_node.logs import configure_node_logging
from pacs_node.refs import CommitmentReport, InstanceRef
from pacs_node.supervisor import Child, NodeLink, Supervisor

log = logging.getLogger(__name__)

_SUBMIT, _COUNT, _DUPLICATE, _REPORT = "submit", "count", "duplicate", "report"
_AUDIT, _ALERTS, _STEP = "audit", "alerts", "step"
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PROCESS_NAME = b"pacs-node-scp"  # at most 15 bytes
SERVE_CHECK_S = 1.0  # how often a worker checks that its ports are served
# Security alerts (and the TLS failure counter) are sent to the node at most once per window,
# as (kind, address, detail, times) with at most this many entries (the rest under one).
ALERT_WINDOW_S = 1.0
ALERT_BATCH_ENTRIES = 64
_BATCHED_COUNTERS = frozenset({TLS_HANDSHAKE_COUNTER})


def drain_s(settings: Settings) -> float:
    """How long a stopping worker lets running associations finish: half the stop's bound
    (``stop_timeout_s``), so a job in progress and the catalog's last writes keep the rest."""
    return settings.node.stop_timeout_s / 2


class _PipeSink:
    """The worker side: every call is pickled and written before the C-STORE is answered.

    Each message carries the system-wide monotonic time taken just before it is written, so the
    main process can merge the workers' pipes in the order instances were acknowledged."""

    def __init__(self, pipe: Connection) -> None:
        self._pipe = pipe
        self._lock = threading.Lock()  # this process's threads only: it dies with the process
        self._batch_lock = threading.Lock()
        self._alerts: dict[Alert, int] = {}
        self._counts: dict[str, int] = {}
        self._timer: threading.Timer | None = None

    def _send(self, kind: str, value: object) -> None:
        with self._lock:
            self._pipe.send((time.monotonic(), kind, value))

    def submit(self, ref: InstanceRef) -> None:
        self._send(_SUBMIT, ref)

    def count(self, name: str, by: int = 1) -> None:
        if name in _BATCHED_COUNTERS:
            with self._batch_lock:
                self._counts[name] = self._counts.get(name, 0) + by
                self._flush_later()
            return
        self._send(_COUNT, (name, by))

    def duplicate(self, study_uid: str) -> None:
        self._send(_DUPLICATE, study_uid)

    def commitment_report(self, report: CommitmentReport) -> None:
        self._send(_REPORT, report)

    def step(self, study_uid: str) -> None:
        """A Performed Procedure Step of ``study_uid`` changed (it is in the catalog)."""
        self._send(_STEP, study_uid)

    def audit(self, item: AuditEvent | Alert) -> None:
        """An association event goes at once; a security alert is gathered for up to
        ``ALERT_WINDOW_S`` and sent in one message: a flood of refused handshakes must not fill
        the pipe the C-STORE acknowledgements wait on."""
        if not isinstance(item, Alert):
            self._send(_AUDIT, item)
            return
        with self._batch_lock:
            key = item
            if key not in self._alerts and len(self._alerts) >= ALERT_BATCH_ENTRIES:
                key = Alert(item.kind, "(other addresses)", "")
            self._alerts[key] = self._alerts.get(key, 0) + 1
            self._flush_later()

    def _flush_later(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(ALERT_WINDOW_S, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def flush(self) -> None:
        """Send the gathered alerts and counts now."""
        with self._batch_lock:
            alerts, self._alerts = self._alerts, {}
            counts, self._counts = self._counts, {}
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
        if alerts:
            self._send(_ALERTS, list(alerts.items()))
        for name, by in counts.items():
            self._send(_COUNT, (name, by))


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the main process dies (even by SIGKILL), so an
    orphan never keeps the DICOM port (elsewhere the parent-pid check below does it), and name
    the process so `ps -o comm` shows what it is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        libc.prctl(PR_SET_NAME, PROCESS_NAME)
    except (OSError, AttributeError):
        pass


def _read_only_catalog(settings: Settings) -> Catalog:
    """The identity screen's handle: read-only (SQLite in WAL and PostgreSQL both let it read
    while the main process writes). The screen opens it when first needed and again after a
    failure; until it opens, the recorder's check is the only one."""
    return open_catalog(settings.node.catalog_url, run_migrations=False, read_only=True)


# A step's write answers a scanner waiting on its DIMSE timeout (often 30 s): a locked or slow
# catalog fails the statement first (answered 0x0213, which the scanner retries).
STEP_STATEMENT_TIMEOUT_S = 10.0


def _steps_catalog(settings: Settings) -> Catalog:
    """The handle Performed Procedure Steps are written with (the main process migrated the
    schema before any worker started): one connection (and one spare) per worker, not a
    pool's worth times the workers, and statements bounded in time."""
    return open_catalog(
        settings.node.catalog_url,
        run_migrations=False,
        statement_timeout_s=STEP_STATEMENT_TIMEOUT_S,
        pool_size=1,
    )


def _run_worker(
    settings: Settings,
    listening: list[tuple[socket.socket, bool]],
    pipe: Connection,
    parent: int,
    limits: SharedLimits,
    control: Connection,
) -> None:
    """Entry point of a worker process: serve until asked to stop (the node's message on
    ``control``, or SIGTERM from the node, from a signal to the whole process group, or as the
    main process's death signal) or the main process is gone, then drain and exit. SIGINT is
    the node's to act on: a Ctrl-C in a terminal reaches every process of the group."""
    link = NodeLink(control)
    _die_with_parent()
    options = settings.node
    configure_node_logging(options)
    spool = Spool(
        options.spool_dir,
        fsync=options.fsync,
        min_free_bytes=options.min_free_mb * 2**20,
        node_id=options.node_name(),
        sync_threads=options.max_associations,
    )
    sink = _PipeSink(pipe)
    scp = StorageSCP(
        settings,
        spool,
        sink,
        limits=limits,
        open_catalog=functools.partial(_read_only_catalog, settings),
        auditor=sink.audit,
        steps_catalog=functools.partial(_steps_catalog, settings),
        on_step=sink.step,
    )
    serving = []
    for sock, tls in listening:
        name = "scp-tls" if tls else "scp"
        thread = threading.Thread(target=scp.serve, args=(sock, None, tls), name=name, daemon=True)
        thread.start()
        serving.append(thread)
    ended = False
    while not link.stopping.wait(SERVE_CHECK_S):
        if os.getppid() != parent:  # the main process is gone: nobody records what we spool
            break
        if not all(thread.is_alive() for thread in serving):
            # A port no longer served in this process: end it, and the node starts another.
            ended = True
            log.error("an SCP worker stopped serving a DICOM port; worker ending to be replaced")
            break
    if link.gone.is_set() or os.getppid() != parent:
        log.error("main process gone; worker stopping")
    stopping = time.monotonic()
    scp.stop()  # closes this process's copy of the listening socket first
    deadline = stopping + drain_s(settings)
    # Let established associations finish their C-STOREs; connections that never sent an
    # A-ASSOCIATE-RQ (port probes) are not worth waiting for.
    while time.monotonic() < deadline and any(
        assoc.is_established for assoc in scp.ae.active_associations
    ):
        time.sleep(0.05)
    cut = sum(1 for assoc in scp.ae.active_associations if assoc.is_established)
    log.info(
        "SCP worker stopped",
        extra={"seconds": round(time.monotonic() - stopping, 2), "associations_cut": cut},
    )
    sink.flush()
    exit_now(1 if ended else 0)  # what it spooled is on disk and in the pipe


class SCPWorkers:
    """The DICOM port served by ``count`` worker processes; records flow to ``sink``."""

    def __init__(
        self,
        settings: Settings,
        sink: RecordSink,
        count: int,
        on_worker_death: Callable[[float], object] | None = None,
        auditor: Callable[[AuditEvent | Alert], None] | None = None,
        on_step: Callable[[str], object] | None = None,
    ) -> None:
        """``auditor``: told, in this process, of every association and security alert a
        worker saw (refused TLS handshakes and certificates included); ``on_step``: told the
        Study Instance UID of each Performed Procedure Step a worker recorded."""
        server_tls(settings)  # a TLS file that does not load fails here, before any worker
        self.settings = settings
        self.sink = sink
        self.auditor = auditor  # the node's audit trail: association events and alerts
        self.on_step = on_step
        self.count = count
        # Called with the dead worker's start time: a worker killed between spooling a file
        # and handing over its row leaves a file the catalog lacks (and a re-send of it is
        # answered as a duplicate), so the node records such files now, not at its next start.
        self.on_worker_death = on_worker_death
        self.listening: socket.socket | None = None
        self.tls_listening: socket.socket | None = None
        self._context = multiprocessing.get_context("spawn")
        # One pipe per worker (its read end here); a dead worker's pipe is read to its end.
        self._pipes: list[Connection] = []
        self._pipes_lock = threading.Lock()
        self._opening: dict[int, tuple[Connection, Connection]] = {}  # a row's pipe, starting
        self._wake, self._waker = self._context.Pipe(duplex=False)
        # Connection and association limits counted across all workers (one row each).
        self.limits = SharedLimits.create(limits_for(settings), rows=count, context=self._context)
        self._stopping = threading.Event()
        self._pump_thread: threading.Thread | None = None
        self.children = Supervisor(
            "SCP worker",
            count,
            _run_worker,
            self._worker_args,
            process_name=PROCESS_NAME.decode(),
            started=self._worker_started,
            died=self._worker_died,
            replaced=self._worker_replaced,
        )

    @property
    def port(self) -> int:
        if self.listening is None:
            raise RuntimeError("the SCP is not serving a plain DICOM port")
        return int(self.listening.getsockname()[1])

    @property
    def tls_port(self) -> int:
        if self.tls_listening is None:
            raise RuntimeError("the SCP is not serving a DICOM TLS port")
        return int(self.tls_listening.getsockname()[1])

    def _sockets(self) -> list[socket.socket]:
        return [s for s in (self.listening, self.tls_listening) if s is not None]

    def start(self) -> None:
        """Bind the DICOM port (the node's last start step: once it answers, every earlier
        instance is in the catalog) and spawn the workers that accept on it."""
        options = self.settings.node
        if options.dicom_port:
            self.listening = bind_listening(options.dicom_host, options.dicom_port)
        if options.dicom_tls_port:
            self.tls_listening = bind_listening(options.dicom_host, options.dicom_tls_port)
        self._pump_thread = threading.Thread(target=self._pump, name="scp-pump", daemon=True)
        self._pump_thread.start()
        self.children.start()
        options = self.settings.node
        log.info(
            "storage SCP listening",
            extra={
                "ae_title": options.ae_title,
                "host": options.dicom_host,
                "port": self.port if self.listening else None,
                "tls_port": self.tls_port if self.tls_listening else None,
                "workers": self.count,
            },
        )

    def _worker_args(self, row: int) -> tuple[object, ...]:
        self.limits.clear_row(row)  # what a dead worker held went with its connections
        reader, writer = self._context.Pipe(duplex=False)
        self._opening[row] = (reader, writer)
        listening = [(s, s is self.tls_listening) for s in self._sockets()]
        return (self.settings, listening, writer, os.getpid(), self.limits.for_row(row))

    def _worker_started(self, child: Child) -> None:
        reader, writer = self._opening.pop(child.slot)
        writer.close()  # the worker holds the only write end: its death ends the pipe
        with self._pipes_lock:
            self._pipes.append(reader)
        self._waker.send(None)  # the pump waits on the new pipe from now on

    def _worker_died(self, child: Child) -> None:
        log.error("SCP worker died; replacing it", extra={"exitcode": child.process.exitcode})
        self.sink.count("scp_worker_restarts")

    def _worker_replaced(self, child: Child) -> None:
        if self.on_worker_death is None:
            return
        try:
            self.on_worker_death(child.started_at)
        except Exception:
            log.exception("recording what the dead SCP worker spooled failed")

    def _dispatch(self, kind: str, value: Any) -> None:
        if kind == _SUBMIT:
            self.sink.submit(value)
        elif kind == _COUNT:
            self.sink.count(*value)
        elif kind == _REPORT:
            self.sink.commitment_report(value)
        elif kind == _STEP:
            if self.on_step is not None:
                self.on_step(value)
        elif kind == _AUDIT:
            if self.auditor is not None:
                self.auditor(value)
        elif kind == _ALERTS:
            for alert, times in value:
                detail = alert.detail
                if times > 1:
                    detail = f"{detail} ({times} times in {ALERT_WINDOW_S:g} s)".lstrip()
                if self.auditor is not None:
                    self.auditor(dataclasses.replace(alert, detail=detail))
        else:
            self.sink.duplicate(value)

    def _pump(self) -> None:
        """Hand on what the workers send, oldest first across pipes.

        A message acknowledged before another was written (whole) before the other's time was
        taken; so when a pipe shows a message, every earlier one is already readable in its own
        pipe. Holding the next message of each pipe and handing on the oldest, after looking
        at every pipe without one, keeps the order in which instances were acknowledged."""
        heads: dict[Connection, tuple[float, str, Any]] = {}
        while True:
            with self._pipes_lock:
                idle = [pipe for pipe in self._pipes if pipe not in heads]
                if self._stopping.is_set() and not self._pipes and not heads:
                    return
            for ready in wait([self._wake, *idle], timeout=0 if heads else None):
                if ready is self._wake:
                    self._wake.recv()
                    continue
                assert isinstance(ready, Connection)
                try:
                    heads[ready] = ready.recv()
                except (EOFError, OSError):  # the worker is gone and its pipe read to the end
                    with self._pipes_lock:
                        self._pipes.remove(ready)
                    ready.close()
            if heads:
                oldest = min(heads, key=lambda pipe: heads[pipe][0])
                _at, kind, value = heads.pop(oldest)
                self._dispatch(kind, value)

    def alive(self) -> bool:
        """Whether every SCP worker process runs (one being replaced: not yet)."""
        return self.children.alive == self.count

    def stop(self, deadline: float | None = None) -> int:
        """Stop accepting, let running associations finish until ``deadline``
        (``time.monotonic()``; default: the workers' drain time and a second), kill the workers
        still there, then drain the pipes. Returns how many workers had to be killed."""
        if deadline is None:
            deadline = time.monotonic() + drain_s(self.settings) + 1.0
        self._stopping.set()
        self.children.request_stop()  # from now on no worker is replaced; each one drains
        for listening in self._sockets():  # new connections are refused now, in every process;
            with contextlib.suppress(OSError):  # established associations have sockets of
                listening.shutdown(socket.SHUT_RDWR)  # their own and go on
        killed = self.children.stop(deadline)
        self._waker.send(None)  # every worker is gone: the pump reads their pipes to the end
        if self._pump_thread is not None:
            self._pump_thread.join(10)
        for listening in self._sockets():
            listening.close()
        return len(killed)

    def kill_now(self) -> None:
        """SIGKILL every worker, waiting for nothing: the node is stopping at once, and what
        they spooled without a catalog row is recorded when it starts again."""
        self.children.kill_now()
