"""Recording audit events in the catalog, without ever holding up or breaking what is audited.

Two ways in. :class:`AuditTrail`, in the node's main process, takes events from any thread
(the SCP's, the web face's, the outbox's) into a queue and writes them in batches on a thread
of its own; a catalog outage keeps them queued and retried (the queue is bounded: past
``MAX_QUEUED`` the oldest are dropped, counted and logged at ERROR, never silently).
:func:`record_now` writes one event at once, for a command at the shell and for services
outside the node process; a failure is logged at ERROR with the event's code, never raised.

Security alerts come in floods (a scan, a hostile client): :meth:`AuditTrail.security_alert`
records the first of a kind from one address per ``ALERT_WINDOW_S`` and folds the repeats into
the next one recorded ("and N more like it"), so a flood cannot fill the catalog.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from pacs_node.audit import events
from pacs_node.audit.events import Alert, AuditEvent
from pacs_node.audit.message import build
from pacs_node.catalog.audit import add_events
from pacs_node.catalog.db import Catalog

log = logging.getLogger(__name__)

MAX_QUEUED = 100_000
ALERT_WINDOW_S = 60.0
RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)

AuditSink = Callable[[AuditEvent | Alert], None]


def record_now(catalog: Catalog, event: AuditEvent) -> bool:
    """Write ``event`` at once; False (logged at ERROR) when the catalog refused it."""
    try:
        xml = build(event)
        with catalog.sessions.begin() as session:
            add_events(session, [(event, xml)])
        return True
    except (SQLAlchemyError, OSError, ValueError) as exc:
        # the class only: a database error's text quotes the row, patient IDs included
        log.error(
            "audit event not recorded",
            extra={
                "event_id": event.event_id.code,
                "action": event.action,
                "error": type(exc).__name__,
            },
        )
        return False


class AuditTrail:
    """The node's audit recorder: ``record`` never blocks; a thread writes."""

    def __init__(self, catalog: Catalog, ae_title: str) -> None:
        self.catalog = catalog
        self.ae_title = ae_title
        self._queue: collections.deque[AuditEvent] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._alerts: dict[tuple[str, str], tuple[float, int]] = {}
        self._alerts_lock = threading.Lock()
        self.listeners: list[Callable[[], None]] = []  # told after each batch is written

    # -- taking events ---------------------------------------------------------------------

    def take(self, item: AuditEvent | Alert) -> None:
        """An event to record, or an alert to rate-limit (what the SCP hands over)."""
        if isinstance(item, Alert):
            self.security_alert(
                item.kind, item.address, item.detail, item.ae_title, item.tls_subject
            )
        else:
            self.record(item)

    def record(self, event: AuditEvent) -> None:
        """Queue ``event``; never raises, never waits on the catalog."""
        with self._wake:
            if len(self._queue) >= MAX_QUEUED:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append(event)
            self._wake.notify()

    def security_alert(
        self,
        kind: str,
        address: str | None,
        detail: str,
        ae_title: str | None = None,
        tls_subject: str | None = None,
    ) -> None:
        """A Security Alert (110113), rate-limited per (kind, address). ``kind``:
        "node-authentication" for a refused certificate or a failed TLS handshake or a
        rejected association (110126), anything else ("hostile-pdu", "limit-reached") for
        110132. The TLS code calls this with the peer's certificate subject when it has one."""
        key = (kind, address or "")
        now = time.monotonic()
        with self._alerts_lock:
            last, repeats = self._alerts.get(key, (-ALERT_WINDOW_S, 0))
            if now - last < ALERT_WINDOW_S:
                self._alerts[key] = (last, repeats + 1)
                return
            self._alerts[key] = (now, 0)
            if len(self._alerts) > 10_000:  # forget the quiet ones
                self._alerts = {
                    k: v for k, v in self._alerts.items() if now - v[0] < ALERT_WINDOW_S
                }
        self.record(
            events.security_alert(
                self.ae_title,
                kind,
                address,
                detail,
                calling_ae=ae_title,
                tls_subject=tls_subject,
                repeats=repeats,
            )
        )

    def flush_alerts(self) -> None:
        """Record the repeats still folded (at stop): none is lost."""
        with self._alerts_lock:
            pending = [(k, n) for k, (_, n) in self._alerts.items() if n]
            self._alerts.clear()
        for (kind, address), repeats in pending:
            self.record(
                events.security_alert(
                    self.ae_title,
                    kind,
                    address or None,
                    "repeated",
                    repeats=repeats,
                )
            )

    # -- writing ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout``), then end the thread."""
        self.flush_alerts()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._queue:
            log.error("audit events not recorded at stop", extra={"events": len(self._queue)})

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._wake:
                if not self._queue and not self._busy:
                    return True
            time.sleep(0.02)
        return False

    _busy = False

    def _take(self) -> list[AuditEvent]:
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait(1.0)
            batch = list(self._queue)[:500]
            for _ in batch:
                self._queue.popleft()
            self._busy = bool(batch)
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.error("audit queue full: oldest events dropped", extra={"events": dropped})
        return batch

    def _run(self) -> None:
        failures = 0
        while True:
            batch = self._take()
            if not batch:
                if self._stopping:
                    return
                continue
            items = []
            for event in batch:
                try:
                    items.append((event, build(event)))
                except ValueError as exc:  # a builder defect: say so, keep the rest
                    log.error(
                        "audit event not built",
                        extra={"event_id": event.event_id.code, "error": type(exc).__name__},
                    )
            try:
                with self.catalog.sessions.begin() as session:
                    add_events(session, items)
            except SQLAlchemyError as exc:
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.warning(
                    "audit events not yet recorded; retrying",
                    extra={"events": len(batch), "retry_s": delay, "error": type(exc).__name__},
                )
                with self._wake:
                    self._queue.extendleft(reversed(batch))
                    self._busy = False
                    if self._stopping and failures > len(RETRY_S):
                        return
                time.sleep(delay)
                continue
            failures = 0
            with self._wake:
                self._busy = False
            for listener in self.listeners:
                listener()
