"""Moves spooled instances into the catalog in batches, off the C-STORE thread.

The SCP acknowledges once the file is fsync'd in the spool; the catalog row follows within
milliseconds from this single writer thread, one transaction per batch. If the process dies in
between, :mod:`pacs_node.ingest.reconcile` records the file at the next start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import record_commitment_report
from pacs_node.catalog.models import utcnow
from pacs_node.catalog.studies import (
    RecordOutcome,
    StudyTouch,
    add_duplicates,
    increment,
    record_instances,
)
from pacs_node.ingest.spool import Spool
from pacs_node.refs import CommitmentReport, InstanceRef

log = logging.getLogger(__name__)

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
        self._thread = threading.Thread(target=self._run, name="catalog-recorder", daemon=True)
        self._thread.start()

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
            outcome = record_instances(session, refs)
        self._after_commit(outcome)
        return outcome

    def _after_commit(self, outcome: RecordOutcome) -> None:
        for relpath in outcome.duplicate_paths:
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
        delay = 0.05
        while True:
            try:
                with self.catalog.sessions.begin() as session:
                    outcome = record_instances(session, refs)
                    for count in counts:
                        increment(session, count.name, count.by)
                    add_duplicates(session, duplicates)
                break
            except Exception:
                # The files are safe in the spool; keep trying (and reconcile covers a crash).
                log.exception("catalog write failed; retrying", extra={"instances": len(refs)})
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            self._after_commit(outcome)
        except Exception:
            log.exception("post-commit listener failed")
        with self._idle:
            self._pending -= len(items)
            self._idle.notify_all()
        if refs:
            log.debug("recorded instances", extra={"instances": outcome.recorded})
        for report in reports:
            self._record_report(report)

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
