"""Patient identity: an instance joins a study only if its UIDs and its patient agree with what
the catalog already holds.

The policy, one rule per collision, is :func:`pacs_node.catalog.identity.decide` (its module
lists the rules).

A collision follows ``identity_conflict``: ``reject`` answers IDENTITY_CONFLICT (0xC010) with an
ErrorComment naming the collision; ``quarantine`` answers success and keeps the bytes, fsync'd,
under the spool's quarantine area with a catalog row and an event on the study it collided
with. A re-send with other bytes follows ``resend_policy``: ``keep_first`` (the new bytes go to
quarantine), ``replace`` (the stored file is swapped in one rename, the row updated and the
study reopened; only over a copy the screen saw catalogued, else as ``keep_first``) or
``reject`` (RESEND_REFUSED, 0xC011). A quarantined instance is never counted
in, routed with or processed as part of any study until an operator releases, re-assigns or
discards it (:mod:`pacs_node.ingest.quarantine`).

The check runs twice. :class:`IdentityGate` screens each C-STORE before the answer, on a
read-only catalog handle (SCP worker processes are separate processes); it fails open when the
catalog cannot answer. The authoritative check runs where rows are written
(:func:`pacs_node.catalog.studies.record_instances`), in the order instances were
acknowledged, so instances of one batch, or acknowledged before the row they collide with was
committed, are still quarantined there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from pacs_node.catalog.identity import (
    REASON_TEXT,
    Action,
    Decision,
    Held,
    Reason,
    Verdict,
    act,
    decide,
    header_key,
)
from pacs_node.catalog.quarantine import being_removed, lookup_one
from pacs_node.errors import IdentityConflict, ResendRefused, StudyBeingRemoved
from pacs_node.statuses import SUCCESS

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from pacs_node.catalog.db import Catalog
    from pacs_node.ingest.recorder import RecordSink
    from pacs_node.ingest.spool import Spool, StoredFile
    from pacs_node.refs import InstanceHeader, InstanceRef

__all__ = [
    "REASON_TEXT",
    "Action",
    "Decision",
    "Held",
    "IdentityGate",
    "Reason",
    "Verdict",
    "act",
    "decide",
    "header_key",
]

log = logging.getLogger(__name__)

WARN_EVERY_S = 60.0
SKIP_AFTER_FAILURE_S = 10.0  # the screen leaves a failing catalog alone this long


IDENTITY_REJECTED = "identity_rejected"
RESEND_REJECTED = "resend_rejected"
REMOVAL_REFUSED = "refused_during_removal"


class IdentityGate:
    """The C-STORE side of the check: :meth:`screen` after the header is read, :meth:`admit`
    after the bytes are spooled (it answers, hands the row on and keeps collisions apart)."""

    def __init__(
        self,
        spool: Spool,
        sink: RecordSink,
        catalog: Catalog | None,
        *,
        identity_conflict: str = "reject",
        resend_policy: str = "keep_first",
        open_catalog: Callable[[], Catalog] | None = None,
    ) -> None:
        """``open_catalog`` opens the read-only handle when ``catalog`` is None: at the first
        C-STORE, and again after a failure (a worker started during a catalog outage screens
        once the catalog is back)."""
        self.spool = spool
        self.sink = sink
        self.catalog = catalog
        self.identity_conflict = identity_conflict
        self.resend_policy = resend_policy
        self._open_catalog = open_catalog
        self._opening = threading.Lock()
        self._skip_until = 0.0
        self._warned_at = 0.0

    def _connect(self) -> Connection | None:
        """A connection for one look-up; None when there is no catalog to ask now (none, still
        opening, or failed less than SKIP_AFTER_FAILURE_S ago: a circuit breaker, so that a
        catalog that hangs costs one C-STORE a timeout, not every one)."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            if self.catalog is None:
                if self._open_catalog is None or not self._opening.acquire(blocking=False):
                    return None
                try:
                    if self.catalog is None:
                        self.catalog = self._open_catalog()
                finally:
                    self._opening.release()
            return self.catalog.engine.connect()
        except Exception as exc:
            self._unavailable(exc)
            return None

    def _unavailable(self, exc: Exception) -> None:
        now = time.monotonic()
        self._skip_until = now + SKIP_AFTER_FAILURE_S
        if not self._warned_at or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "identity screen cannot read the catalog; the recorder checks instead",
                extra={"error": type(exc).__name__},
            )

    def screen(self, header: InstanceHeader) -> Decision:
        """Refuse a colliding instance before anything is written (``identity_conflict:
        reject``); otherwise say what :meth:`admit` must do with it."""
        connection = self._connect()
        if connection is None:
            return Decision(Verdict.NEW)
        try:
            with connection:
                held = lookup_one(
                    connection, header.study_uid, header.series_uid, header.sop_instance_uid
                )
        except Exception as exc:  # fail open: record_instances is authoritative
            self._unavailable(exc)
            return Decision(Verdict.NEW)
        decision = decide(
            header.study_uid,
            header.series_uid,
            header_key(header),
            None,
            Held.of(held, header.study_uid, header.series_uid, header.sop_instance_uid),
        )
        if decision.verdict == Verdict.CONFLICT and self.identity_conflict == "reject":
            self.sink.count(IDENTITY_REJECTED)
            raise IdentityConflict(REASON_TEXT[decision.reason or Reason.SOP_ELSEWHERE])
        return decision

    def being_removed(self, study_uid: str) -> bool:
        """Retention is removing ``study_uid`` (False when the catalog cannot say)."""
        connection = self._connect()
        if connection is None:
            return False
        try:
            with connection:
                return being_removed(connection, study_uid)
        except Exception as exc:
            self._unavailable(exc)
            return False

    def admit(self, screening: Decision, stored: StoredFile, ref: InstanceRef) -> int:
        """Answer for a spooled instance: hand it to the recorder as it is, as a duplicate, as
        a quarantined copy or as a replacement; or refuse it (and remove what only it wrote)."""
        with self.spool.retention_lock(shared=True):
            return self._admit(screening, stored, ref)

    def _admit(self, screening: Decision, stored: StoredFile, ref: InstanceRef) -> int:
        ref = replace(ref, sha256=stored.sha256 or None)
        if self.being_removed(ref.study_uid) or (
            stored.identical and not self.spool.path(stored.relpath).exists()
        ):
            if not stored.duplicate:
                self.spool.remove(stored.relpath)
            if stored.held is not None and stored.held_new:
                self.spool.remove(stored.held)
            self.sink.count(REMOVAL_REFUSED)
            raise StudyBeingRemoved("retention is removing this study; send it again later")
        conflict = screening.verdict == Verdict.CONFLICT
        if stored.identical:
            self.sink.duplicate(ref.study_uid)
            return SUCCESS
        if stored.held is not None:  # the name holds another data set: a re-send
            if conflict:  # identity first (only reached under identity_conflict: quarantine)
                reason = screening.reason or Reason.RESEND
                self.sink.submit(replace(ref, path=stored.held, quarantine_reason=reason))
                return SUCCESS
            action = act(Decision(Verdict.RESEND, Reason.RESEND), "", self.resend_policy)
            if action == Action.REPLACE and screening.verdict != Verdict.DUPLICATE:
                # Only a copy the screen saw committed at this very place may be overwritten:
                # one still queued (or unseen: no catalog) may yet prove another patient's, and
                # its bytes would be gone. Kept apart instead, as keep_first does.
                action = Action.QUARANTINE
            if action == Action.REJECT:
                if stored.held_new:
                    self.spool.remove(stored.held)
                self.sink.count(RESEND_REJECTED)
                raise ResendRefused(REASON_TEXT[Reason.RESEND])
            if action == Action.REPLACE:
                self.spool.swap_in(stored.held, stored.relpath)
                if stored.held_new:
                    self.spool.remove(stored.held)
                self.sink.submit(replace(ref, replaces=True))
                return SUCCESS
            self.sink.submit(replace(ref, path=stored.held, quarantine_reason=Reason.RESEND))
            return SUCCESS
        # A fresh file, colliding or not, stays under its own name until its row commits: the
        # recorder's check quarantines a collision (linking it apart, then removing the name),
        # and until then reconciliation finds it there.
        self.sink.submit(ref)
        return SUCCESS
