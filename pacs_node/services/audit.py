"""The audit trail as the doors read it: its events since a time, reading itself audited.

Every read of the audit log is recorded as DICOM 110101 Audit Log Used (PS3.15 A.5.3.2)
before the events are returned, so the read shows up in what it lists.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from pacs_node.actor import Actor
from pacs_node.audit import events
from pacs_node.audit.events import StudyObject
from pacs_node.audit.trail import record_now
from pacs_node.catalog.audit import (
    AuditPage,
    delivery_study,
    job_study,
    list_events,
    study_object,
)
from pacs_node.catalog.db import Catalog

log = logging.getLogger(__name__)

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 date or time (local time when it names no offset) or a span
    back from now (``90s``, ``15m``, ``2h``, ``7d``). ValueError names what is wrong."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        span = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return (now or datetime.now(UTC)) - span
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"not a time: {text!r} (ISO 8601 like 2026-12-05T10:00+01:00, or 15m, 2h, 7d)"
        ) from exc
    if value.tzinfo is None:
        value = value.astimezone()  # the local time zone
    return value


def read_audit_log(
    catalog: Catalog,
    actor: Actor,
    since: datetime | None = None,
    *,
    address: str | None = None,
    limit: int = 1000,
    after_id: int | None = None,
) -> AuditPage:
    """A page of the audit events (see :func:`~pacs_node.catalog.audit.list_events`); the
    read itself is audited first, and a read that cannot be audited is refused
    (:class:`AuditUnavailable`): no one reads the trail unseen."""
    if not record_now(catalog, events.audit_log_used(str(actor), catalog.url, address)):
        raise AuditUnavailable("the read of the audit log could not be audited; refused")
    with catalog.sessions() as session:
        return list_events(session, since, limit, after_id=after_id)


class AuditUnavailable(RuntimeError):
    """Reading the trail refused: its own 110101 event could not be recorded."""


class PatientReads:
    """Audits reads of patient data (110103) and searches (110112) from the web face.

    A viewer fetches a study's frames by the hundred: the same (user, address, study, kind)
    is audited once per ``window_s``, and the same search once per ``window_s``, so the trail
    says who read what without one row per image."""

    def __init__(self, catalog: Catalog, ae_title: str, window_s: float = 300.0) -> None:
        self.catalog = catalog
        self.ae_title = ae_title
        self.window_s = window_s
        self._seen: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def _first(self, key: tuple[str, ...]) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self.window_s:
                return False
            self._seen[key] = now
            if len(self._seen) > 50_000:
                self._seen = {k: v for k, v in self._seen.items() if now - v < self.window_s}
            return True

    def read(self, user: str, address: str | None, study_uid: str, what: str) -> None:
        if not self._first(("read", user, address or "", study_uid, what)):
            return
        try:
            with self.catalog.sessions() as session:
                study = study_object(session, study_uid)
        except SQLAlchemyError:
            study = None
        if study is None:
            study = StudyObject(study_uid)
        record_now(self.catalog, events.instances_read(user, address, study, what))

    def query(self, user: str, address: str | None, query_text: str) -> None:
        if not self._first(("query", user, address or "", query_text)):
            return
        record_now(self.catalog, events.query(user, address, self.ae_title, query_text))


def audit_operation(
    catalog: Catalog,
    actor: Actor,
    operation: str,
    *,
    study_uid: str | None = None,
    job_id: int | None = None,
    delivery_id: int | None = None,
    ok: bool = True,
    detail: str | None = None,
) -> None:
    """An operator's change (re-run, retry, cancel, release, reject) on a study's processing,
    as DICOM Instances Accessed (110103, see :mod:`pacs_node.audit.events`); never raises."""
    if study_uid is None and job_id is None and delivery_id is None:
        raise ValueError("an operation names a study, a job or a delivery")
    found: StudyObject | None = None
    try:
        with catalog.sessions() as session:
            if study_uid is not None:
                found = study_object(session, study_uid)
            elif job_id is not None:
                found = job_study(session, job_id)
            elif delivery_id is not None:
                found = delivery_study(session, delivery_id)
    except SQLAlchemyError as exc:
        log.warning(
            "study of an operation not found for its audit event",
            extra={"error": type(exc).__name__},
        )
    # a study named but not in the catalog is still that study; a job's or a delivery's that
    # is gone is left out (its number is in the description), never given a made-up UID
    study = found or (StudyObject(study_uid) if study_uid is not None else None)
    text = detail or operation
    if job_id is not None:
        text += f" (job {job_id})"
    if delivery_id is not None:
        text += f" (delivery {delivery_id})"
    record_now(catalog, events.operator_action(str(actor), operation, study, ok=ok, detail=text))
