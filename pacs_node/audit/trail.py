"""Recording audit events in the catalog, without ever holding up or breaking what is audited.

Two ways in. :class:`AuditTrail`, in the node's main process, takes events from any thread
(the SCP's, the web face's, the outbox's) into a queue and writes them in batches on a thread
of its own; a catalog outage keeps them queued and retried (the queue is bounded: past
``MAX_QUEUED`` the oldest are dropped, counted and logged at ERROR, never silently).
:func:`record_now` writes one event at once, for a command at the shell and for services
outside the node process; a failure is logged at ERROR with the event's code, never raised.

Security alerts and refused sign-ins come in floods (a scan, a hostile client, a password
guesser): per key (kind, address, calling AE; or address and reason) the first in each
``ALERT_WINDOW_S`` is recorded, the repeats are counted, and when the window ends the count
is recorded as a summary event of that key ("and N more like it"). At stop, and when the table
of keys is pruned, pending counts are recorded too: none is discarded.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from pacs_node.audit import events
from pacs_node.audit.events import Alert, AuditEvent
from pacs_node.audit.message import build, violation
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
    except Exception as exc:
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


class Folds:
    """Per-key flood folding: :meth:`offer` says whether an event is the first of its key in
    the window; :meth:`due` hands out the summaries of windows that ended with repeats."""

    def __init__(self, window_s: float, max_keys: int = 10_000) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        # key -> (window start, repeats, how to summarise them)
        self._keys: dict[tuple[str, ...], tuple[float, int, Callable[[int], AuditEvent]]] = {}
        self._lock = threading.Lock()

    def offer(
        self,
        key: tuple[str, ...],
        summary: Callable[[int], AuditEvent],
        now: float | None = None,
    ) -> tuple[bool, list[AuditEvent]]:
        """(record this one?, summaries now due: those of ended windows, this key's first)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            held = self._keys.get(key)
            if held is not None and now - held[0] < self.window_s:
                self._keys[key] = (held[0], held[1] + 1, summary)
                return False, []
            due = [held[2](held[1])] if held is not None and held[1] else []
            self._keys[key] = (now, 0, summary)
            if len(self._keys) > self.max_keys:
                due += self._ended(now)
        return True, due

    def due(self, now: float | None = None, *, everything: bool = False) -> list[AuditEvent]:
        """The summaries of ended windows (of every window with ``everything``); their keys
        are forgotten."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if everything:
                held, self._keys = self._keys, {}
                return [summary(n) for _, n, summary in held.values() if n]
            return self._ended(now)

    def due_soon(self, now: float | None = None) -> bool:
        """Whether a window with repeats has ended (the writer then hands out its summary)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return any(n and now - start >= self.window_s for start, n, _ in self._keys.values())

    def _ended(self, now: float) -> list[AuditEvent]:
        ended = [k for k, (start, _, _) in self._keys.items() if now - start >= self.window_s]
        out = []
        for key in ended:
            _, repeats, summary = self._keys.pop(key)
            if repeats:
                out.append(summary(repeats))
        return out


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
        self.folds = Folds(ALERT_WINDOW_S)
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

    def folded(
        self, key: tuple[str, ...], event: AuditEvent, summary: Callable[[int], AuditEvent]
    ) -> None:
        """Record ``event`` unless its ``key`` was recorded within the window; then it is
        counted, and ``summary(count)`` recorded when the window ends."""
        first, due = self.folds.offer(key, summary)
        for pending in due:
            self.record(pending)
        if first:
            self.record(event)

    def security_alert(
        self,
        kind: str,
        address: str | None,
        detail: str,
        ae_title: str | None = None,
        tls_subject: str | None = None,
    ) -> None:
        """A Security Alert (110113), folded per (kind, address, calling AE). ``kind``:
        "node-authentication" for a refused certificate or a failed TLS handshake or a
        rejected association (110126), anything else ("hostile-pdu", "limit-reached") for
        110132. The TLS code calls this with the peer's certificate subject when it has one."""

        def alert(repeats: int = 0, text: str = detail) -> AuditEvent:
            return events.security_alert(
                self.ae_title,
                kind,
                address,
                text,
                calling_ae=ae_title,
                tls_subject=tls_subject,
                repeats=repeats,
            )

        # without an address (a guard's counter) the detail keeps counters of one kind apart
        key = ("alert", kind, address or "", ae_title or "", "" if address else detail)
        self.folded(key, alert(), lambda n: alert(n, "repeated"))

    def sign_in_refused(self, user: str | None, address: str | None, reason: str) -> None:
        """A refused sign-in (110114 Login, minor failure), folded per (address, reason): a
        password guesser or a flood of bad tokens costs one row a window, and a count.
        ``user``: the account named, None when the name is no account (never kept: it may
        be a password typed in the wrong field)."""

        def refused(repeats: int = 0) -> AuditEvent:
            text = reason if not repeats else f"{reason} (and {repeats} more like it)"
            return events.user_authentication(
                user if user and not repeats else "unknown user",
                address,
                login=True,
                ok=False,
                reason=text,
            )

        self.folded(("sign-in", address or "", reason), refused(), refused)

    def flush_alerts(self) -> None:
        """Record the repeats still folded (at stop): none is lost."""
        for pending in self.folds.due(everything=True):
            self.record(pending)

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
        for pending in self.folds.due():  # the counts of flood windows that ended
            self.record(pending)
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait(1.0)
                if self.folds.due_soon():
                    break
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
            try:
                batch = self._take()
                if not batch:
                    if self._stopping:
                        return
                    continue
                failures = self._write(batch, failures)
                if failures > len(RETRY_S) and self._stopping:
                    return
            except Exception as exc:  # a defect: say which, and keep recording the rest
                log.error("audit trail error", extra={"error": type(exc).__name__})
                with self._wake:
                    self._busy = False
                time.sleep(0.5)

    def _write(self, batch: list[AuditEvent], failures: int) -> int:
        """Write ``batch``; the failures in a row after it (0 when written)."""
        items = []
        for event in batch:
            try:
                xml = build(event)
            except Exception as exc:  # a builder defect: say so, keep the rest
                log.error(
                    "audit event not built",
                    extra={"event_id": event.event_id.code, "error": type(exc).__name__},
                )
                continue
            where = violation(xml)
            if where is not None:  # kept all the same: a record off the schema beats none
                log.error(
                    "audit message does not follow the PS3.15 schema",
                    extra={"event_id": event.event_id.code, "element": where},
                )
            items.append((event, xml))
        try:
            with self.catalog.sessions.begin() as session:
                add_events(session, items)
        except Exception as exc:
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
                    return failures
            time.sleep(delay)
            return failures
        with self._wake:
            self._busy = False
        for listener in self.listeners:
            try:
                listener()
            except Exception as exc:
                log.error("audit listener failed", extra={"error": type(exc).__name__})
        return 0
