"""Moves spooled instances into the catalog in batches, off the C-STORE thread.

The SCP acknowledges once the file is fsync'd in the spool; the catalog row follows within
milliseconds from this single writer thread, one transaction per batch. If the process dies in
between, :mod:`pacs_node.ingest.reconcile` records the file at the next start.

Failures are told apart. A transient one (the database unreachable, a dropped connection,
SQLite busy or locked) is retried with backoff for as long as it lasts: the files are safe in
the spool, the outage is counted, warned about at most once a minute, and shown by
``pacs-node status`` (a flag file in the spool, since the catalog itself may be what is down).
Any other failure is the data's: the batch is split in halves until the one instance the
catalog cannot take is found; it is recorded in quarantine (reason ``unrecordable``) in a
transaction of its own, and if even that fails it is logged and counted and its file stays in
the spool, for reconciliation at the next start. The rest of the batch is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import record_commitment_report
from pacs_node.catalog.models import utcnow
from pacs_node.catalog.studies import (
    RecordOutcome,
    StudyTouch,
    add_duplicates,
    add_quarantined,
    increment,
    path_in_use,
    record_instances,
)
from pacs_node.ingest.identity import Reason
from pacs_node.ingest.spool import Spool
from pacs_node.refs import CommitmentReport, InstanceRef

log = logging.getLogger(__name__)

OUTAGE_FILE = ".catalog-outage.json"  # in the spool root: read by `pacs-node status`
WARN_EVERY_S = 60.0
BACKOFF_MAX_S = 5.0


def is_transient(exc: BaseException) -> bool:
    """A failure of the database, not of the data: worth retrying as it is."""
    if isinstance(exc, (OperationalError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return True
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


TouchListener = Callable[[Sequence[StudyTouch]], None]


class RecordSink(Protocol):
    """Where the SCP hands what it spooled: the recorder, or a pipe to it from a worker process."""

    def submit(self, ref: InstanceRef) -> None: ...

    def count(self, name: str, by: int = 1) -> None: ...

    def duplicate(self, study_uid: str) -> None: ...

    def commitment_report(self, report: CommitmentReport) -> None: ...


@dataclass(frozen=True, slots=True)
class _Count:
    name: str
    by: int = 1


@dataclass(frozen=True, slots=True)
class _Duplicate:
    study_uid: str


_STOP = object()


class CatalogRecorder:
    def __init__(
        self,
        catalog: Catalog,
        spool: Spool,
        *,
        batch_max: int = 500,
        linger_s: float = 0.1,
    ) -> None:
        self.catalog = catalog
        self.spool = spool
        self.batch_max = batch_max
        self.linger_s = linger_s
        self._queue: queue.Queue[object] = queue.Queue()
        self._listeners: list[TouchListener] = []
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0
        self.outage_since: float | None = None  # wall-clock start of the current outage
        self.outage_error: str | None = None
        self.outages = 0
        self.unrecorded = 0  # instances neither recorded nor quarantined (left to reconcile)
        self._warned_at = 0.0

    def add_listener(self, listener: TouchListener) -> None:
        self._listeners.append(listener)

    def submit(self, ref: InstanceRef) -> None:
        self._put(ref)

    def count(self, name: str, by: int = 1) -> None:
        self._put(_Count(name, by))

    def duplicate(self, study_uid: str) -> None:
        """A second copy of an instance already spooled: the first was kept, count this one."""
        self._put(_Duplicate(study_uid))

    def commitment_report(self, report: CommitmentReport) -> None:
        """A Storage Commitment report a PACS sent on its own association: settle its rows."""
        self._put(report)

    def _put(self, item: object) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    def start(self) -> None:
        self._write_status()  # a flag a previous run left is stale now
        self._thread = threading.Thread(target=self._run, name="catalog-recorder", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Whether the writer thread runs (received instances reach the catalog)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Record what is queued, then stop."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """True once every submitted item is committed (used at shutdown and in tests)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def record(self, refs: Sequence[InstanceRef]) -> RecordOutcome:
        """Record ``refs`` now, in the calling thread (reconciliation uses this)."""
        with self.catalog.sessions.begin() as session:
            outcome = record_instances(session, refs, hold=self._hold)
        self._after_commit(outcome)
        return outcome

    def record_each(self, refs: list[InstanceRef]) -> int:
        """Record ``refs`` now, in the calling thread, as the recorder thread does: an instance
        the catalog cannot take is quarantined on its own, the rest recorded (reconciliation
        uses this, so one bad file never stops the node from starting)."""
        return self._record_split(refs) if refs else 0

    def _hold(self, ref: InstanceRef) -> tuple[str, str, int]:
        held = self.spool.hold(ref.path, ref.sop_instance_uid)
        return held.relpath, held.sha256, held.size_bytes

    def _after_commit(self, outcome: RecordOutcome) -> None:
        for relpath in outcome.release_paths:  # their bytes are in quarantine now
            self.spool.remove(relpath)
        if outcome.touches:
            for listener in self._listeners:
                listener(outcome.touches)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = [self._queue.get()]
            deadline = time.monotonic() + self.linger_s
            while len(items) < self.batch_max:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        items.append(self._queue.get(timeout=remaining))
                    else:
                        items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in items:
                stopping = True
                items = [item for item in items if item is not _STOP]
            if items:
                self._commit_with_retry(items)

    def _commit_with_retry(self, items: list[object]) -> None:
        refs = [item for item in items if isinstance(item, InstanceRef)]
        counts = [item for item in items if isinstance(item, _Count)]
        duplicates = [item.study_uid for item in items if isinstance(item, _Duplicate)]
        reports = [item for item in items if isinstance(item, CommitmentReport)]
        recorded = self._record_split(refs) if refs else 0
        if counts or duplicates:
            self._record_counts(counts, duplicates)
        with self._idle:
            self._pending -= len(items)
            self._idle.notify_all()
        if refs:
            log.debug("recorded instances", extra={"instances": recorded})
        for report in reports:
            self._record_report(report)

    def _transaction(self, work: Callable[[], RecordOutcome | None]) -> RecordOutcome | None:
        """Run ``work`` until it succeeds or fails for a reason other than the database's."""
        delay = 0.05
        while True:
            try:
                outcome = work()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._outage(exc)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            self._recovered()
            return outcome

    def _record_split(self, refs: list[InstanceRef]) -> int:
        """Record ``refs``; on a failure of the data, bisect down to the poison instance."""

        def work() -> RecordOutcome:
            with self.catalog.sessions.begin() as session:
                return record_instances(session, refs, hold=self._hold)

        try:
            outcome = self._transaction(work)
        except Exception:
            if len(refs) == 1:
                self._poison(refs[0])
                return 0
            log.warning(
                "catalog refused a batch; splitting it to find the instance at fault",
                extra={"instances": len(refs)},
            )
            middle = len(refs) // 2
            return self._record_split(refs[:middle]) + self._record_split(refs[middle:])
        if outcome is None:
            return 0
        try:
            self._after_commit(outcome)
        except Exception:
            log.exception("post-commit listener failed")
        return outcome.recorded

    def _poison(self, ref: InstanceRef) -> None:
        """The catalog cannot record this instance: keep it in quarantine, on its own."""
        log.exception(
            "instance cannot be recorded; keeping it in quarantine",
            extra={"sop_instance_uid": ref.sop_instance_uid, "study_uid": ref.study_uid},
        )
        moved = ref.quarantine_reason is None

        def work() -> RecordOutcome:
            path, size = ref.path, ref.size_bytes
            sha: str | None = ref.sha256
            if moved:
                path, sha, size = self._hold(ref)
            with self.catalog.sessions.begin() as session:
                add_quarantined(
                    session,
                    replace(ref, sha256=sha),
                    reason=Reason.UNRECORDABLE,
                    path=path,
                    sha256=sha,
                    size_bytes=size,
                    collided_study_uid=None,
                )
                # a replacement's name is an instance row's: only the copy goes apart
                release = moved and not path_in_use(session, ref.path)
            return RecordOutcome(release_paths=[ref.path] if release else [])

        try:
            outcome = self._transaction(work)
        except Exception:
            self.unrecorded += 1
            self._write_status()
            log.exception(
                "instance cannot be quarantined either; its file stays in the spool (or its "
                "quarantine area) for reconciliation at the next start",
                extra={"sop_instance_uid": ref.sop_instance_uid, "unrecorded": self.unrecorded},
            )
            return
        if outcome is not None:
            self._after_commit(outcome)

    def _record_counts(self, counts: list[_Count], duplicates: list[str]) -> None:
        def work() -> None:
            with self.catalog.sessions.begin() as session:
                for count in counts:
                    increment(session, count.name, count.by)
                add_duplicates(session, duplicates)

        try:
            self._transaction(work)
        except Exception:
            log.exception("counters not recorded", extra={"counters": len(counts)})

    def _outage(self, exc: Exception) -> None:
        now = time.monotonic()
        first = self.outage_since is None
        if first:
            self.outage_since = time.time()
            self.outages += 1
        self.outage_error = type(exc).__name__
        if first or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "catalog unavailable; instances stay in the spool and are recorded when it is back",
                extra={
                    "error": self.outage_error,
                    "pending": self._pending,
                    "since": self.outage_since,
                },
            )
            self._write_status()

    def _recovered(self) -> None:
        if self.outage_since is None:
            return
        seconds = time.time() - self.outage_since
        self.outage_since = None
        log.warning("catalog available again", extra={"outage_s": round(seconds, 1)})
        self._write_status()
        try:
            with self.catalog.sessions.begin() as session:
                increment(session, "catalog_outages")
                increment(session, "catalog_outage_seconds", round(seconds))
        except Exception:
            log.warning("catalog outage not counted", exc_info=True)

    def status(self) -> dict[str, object]:
        """What ``pacs-node status`` shows about the recorder."""
        return {
            "catalog_available": self.outage_since is None,
            "outage_since": self.outage_since,
            "last_error": self.outage_error,
            "outages": self.outages,
            "pending": self._pending,
            "unrecorded": self.unrecorded,
            "written_at": time.time(),
        }

    def _write_status(self) -> None:
        """The flag file: written on every change of the outage state (the catalog may be
        what is down, so the state cannot live there)."""
        path = self.spool.root / OUTAGE_FILE
        try:
            if self.outage_since is None and self.unrecorded == 0:
                path.unlink(missing_ok=True)
                return
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(self.status()), encoding="utf-8")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)  # a full disk leaves a partial one behind
        except OSError:
            log.warning("recorder status file not written", exc_info=True)

    def _record_report(self, report: CommitmentReport) -> None:
        """In a transaction of its own, so a report the catalog cannot take never holds up the
        instances; it is lost then, and housekeeping asks the PACS again."""
        try:
            with self.catalog.sessions.begin() as session:
                settled = record_commitment_report(session, report, utcnow())
        except Exception:
            log.exception(
                "storage commitment report not recorded; it will be asked for again",
                extra={"calling_ae": report.calling_ae, "transaction_uid": report.transaction_uid},
            )
            return
        log.info(
            "storage commitment report recorded",
            extra={
                "calling_ae": report.calling_ae,
                "transaction_uid": report.transaction_uid,
                "committed": len(report.committed),
                "failed": len(report.failed),
                "deliveries_settled": settled,
            },
        )
