"""Housekeeping: retention of the spool and the results, on an APScheduler interval.

A study may be removed only when the node no longer holds anything nobody else has: it is
stable, every job is over and at least one is done, it has deliveries, and every delivery is
delivered and confirmed (Storage Commitment ``committed`` where the DICOM destination offers it,
the C-STORE / STOW-RS / FHIR success where it does not; see :mod:`.dispatch.commitment`).
Studies that were not processed, or whose results wait for a destination, are kept.

Among those, a study goes when ``retention_days`` have passed since its last instance arrived,
or, oldest first, while the data disk is fuller than ``retention_disk_percent``.

Removal is ordered so that a crash at any point leaves no row pointing at a missing file and
never brings a removed study back::

    1. one transaction: the study's rows go (series, instances, jobs, results, deliveries,
       events, by cascade) and a ``purges`` row lists its files;
    2. the files are removed (a file a live row names again is kept);
    3. the ``purges`` row gets ``files_removed_at``.

:func:`finish_purges` runs step 2-3 for any row a crash left unfinished; the node calls it at
start *before* reconciling the spool, so reconciliation never sees those files.

An instance that arrives for a study being removed is never acknowledged and then deleted.
Steps 1 and 2 hold the spool's retention lock exclusively; the Storage SCP holds it shared
from its last check to its answer (:meth:`pacs_node.ingest.identity.IdentityGate.admit`) and
refuses, with OUT_OF_RESOURCES_STUDY_BEING_REMOVED (0xA710, "send it again later"), an instance
whose study has a ``purges`` row whose files are not yet removed, or whose identical copy it
would rely on is gone. Step 1 also holds the lock every writer of instance rows takes, and
re-checks there that the study is still eligible and that no instance arrived since the pass
chose it: a row recorded before that is seen (the study is kept), one recorded after it starts
a new study, never one the delete's cascade takes. One acknowledged before step 1 whose row is
still on its way is a new file, which step 2 does not list, so it survives and is recorded
as a new study; a re-send that replaced a listed file (``resend_policy: replace``), which step
2 keeps because its bytes differ from the digest the removed row recorded; or an identical
re-send of a file the node already held, which retention removes like the rest of the study:
its bytes are the very ones retention removes, and a duplicate never reopens a study or is
processed again, whenever it arrives. Once the files are removed, the same instance is
received as a new study.
Delivered rows still waiting for a commitment report are asked again on each pass.
Modality Performed Procedure Steps go with their study; one whose study never came goes after
``mpps_retention_days``, and one never ended after ``max_wait_s`` more (each pass).

The audit trail (``audit_events``) is never purged: it has no link to the study rows that go,
and each purge is itself audited (110105 DICOM Study Deleted) in step 1's transaction.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Exists

from pacs_node.actor import Actor
from pacs_node.audit import events as audit_events
from pacs_node.catalog import nodes
from pacs_node.catalog.audit import add_events_within, study_object
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import settle_commitment
from pacs_node.catalog.models import (
    Commitment,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Purge,
    Result,
    Series,
    Study,
    StudyState,
    utcnow,
)
from pacs_node.catalog.mpps import expire_steps, forget_steps
from pacs_node.catalog.studies import lock_for_write
from pacs_node.config import Settings
from pacs_node.dispatch.commitment import CONFIRMED, CommitmentAnswer, Reference
from pacs_node.ingest.spool import file_digest, retention_lock
from pacs_node.timer_lease import TimerLease

log = logging.getLogger(__name__)

REASON_DAYS = "retention_days"
HOUSEKEEPING = Actor.node("housekeeping")
REASON_DISK = "disk_watermark"
NODE_RETENTION = timedelta(days=7)  # a registration without a heartbeat this long goes
DiskUsage = Callable[[Path], float]  # percent of the disk holding the path that is used


def disk_percent_used(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return 100.0 * usage.used / usage.total if usage.total else 0.0


@dataclass
class HousekeepingReport:
    purged: list[str] = field(default_factory=list)  # Study Instance UIDs
    finished: int = 0  # purges a crash had left unfinished
    recommitted: int = 0  # deliveries whose commitment was confirmed on this pass
    steps_expired: int = 0  # performed procedure steps nothing will use
    nodes_pruned: int = 0  # registrations of nodes gone for NODE_RETENTION


def _unconfirmed_delivery() -> Exists:
    """SQL: the study has a delivery that is not (delivered and confirmed); one rejected at the
    quality gate, or cancelled with its job, is settled, so it does not keep its study forever."""
    settled = [DeliveryState.DELIVERED, DeliveryState.REJECTED, DeliveryState.CANCELLED]
    unconfirmed = (Delivery.state.not_in(settled)) | (
        Delivery.commitment.is_not(None)
        & Delivery.commitment.not_in([c for c in CONFIRMED if c is not None])
    )
    return exists().where(Delivery.job_id == Job.id, Job.study_id == Study.id, unconfirmed)


def eligible_studies(session: Session) -> list[Study]:
    """Studies the node may forget, oldest last instance first."""
    has_done = exists().where(Job.study_id == Study.id, Job.state == JobState.DONE)
    job_open = exists().where(
        Job.study_id == Study.id,
        Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.FAILED]),
    )
    has_delivery = exists().where(Delivery.job_id == Job.id, Job.study_id == Study.id)
    query = (
        select(Study)
        .where(
            Study.state == StudyState.STABLE,
            has_done,
            ~job_open,
            has_delivery,
            ~_unconfirmed_delivery(),
        )
        .order_by(Study.last_received_at, Study.id)
    )
    return list(session.scalars(query))


def purge_study(
    session: Session,
    study: Study,
    reason: str,
    now: datetime,
    *,
    selected_last: datetime | None = None,
) -> Purge | None:
    """Step 1: the study's rows go and a ``purges`` row lists its files (and the digest of
    each, see :func:`_replaced`), in the caller's transaction. None when the study changed
    meanwhile: no longer eligible, or (``selected_last``: its last arrival when the pass chose
    it) an instance arrived since.

    The check and the delete hold the lock every writer of instance rows takes
    (:func:`~pacs_node.catalog.studies.lock_for_write`): an instance recorded before it is
    seen here (the study reopened, or its last arrival moved), one recorded after it finds
    the study gone and starts a new one. Without it an instance committed between the check
    and the delete would have its row removed by the cascade."""
    lock_for_write(session)
    if selected_last is not None:
        last = session.scalar(select(Study.last_received_at).where(Study.id == study.id))
        if last != selected_last:
            return None
    if study.id not in {s.id for s in eligible_studies(session)}:
        return None
    rows = session.execute(
        select(Instance.path, Instance.size_bytes, Instance.sha256)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study.id)
    ).all()
    job_ids = list(session.scalars(select(Job.id).where(Job.study_id == study.id)))
    result_size = session.scalar(
        select(func.coalesce(func.sum(Result.size_bytes), 0)).where(Result.job_id.in_(job_ids))
    )
    purge = Purge(
        study_uid=study.study_uid,
        reason=reason,
        instances=len(rows),
        size_bytes=sum(int(size) for _, size, _ in rows) + int(result_size or 0),
        paths={
            "spool": [str(path) for path, _, _ in rows],
            "sha256": [sha or "" for _, _, sha in rows],  # in the order of "spool"
            "results": [str(j) for j in job_ids],
        },
        purged_at=now,
    )
    session.add(purge)
    session.execute(delete(Study).where(Study.id == study.id))  # cascades to every child row
    forget_steps(session, study.study_uid)  # keyed by UID (a step may come before its study)
    session.flush()
    return purge


def _remove_files(purge: Purge, spool_dir: Path, results_dir: Path, keep: set[str]) -> None:
    """Step 2: remove what the purge lists, but for the spool files in ``keep``."""
    paths = purge.paths
    folders: set[Path] = set()
    for relpath in paths.get("spool", []):
        if relpath in keep:
            continue
        path = spool_dir / relpath
        path.unlink(missing_ok=True)
        folders.update(path.parents)
    for job in paths.get("results", []):
        shutil.rmtree(results_dir / job, ignore_errors=True)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder != spool_dir and spool_dir in folder.parents:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def _replaced(purge: Purge, spool_dir: Path) -> set[str]:
    """The listed spool files whose bytes are no longer those their removed rows recorded: a
    re-send replaced them (``resend_policy: replace``), acknowledged before step 1, and
    their rows are still on their way (the recorder records them as a new study;
    reconciliation, after a crash). Read before the exclusive lock is taken, so hashing a
    large study does not hold receptions up: from step 1 on, the study's instances are
    refused, so these files no longer change."""
    paths = purge.paths
    replaced: set[str] = set()
    for relpath, recorded in zip(paths.get("spool", []), paths.get("sha256", []), strict=False):
        if not recorded:
            continue
        try:
            if file_digest(spool_dir / relpath) != recorded:
                replaced.add(relpath)
        except FileNotFoundError:
            continue
    for relpath in sorted(replaced):
        log.warning("file replaced by a re-send kept", extra={"path": relpath})
    return replaced


def finish_purges(catalog: Catalog, spool_dir: Path, results_dir: Path) -> int:
    """Steps 2-3 for every purge whose files are not yet removed; how many were finished."""
    with catalog.sessions() as session:
        pending = list(session.scalars(select(Purge).where(Purge.files_removed_at.is_(None))))
        if not pending:
            return 0
    for purge in pending:
        replaced = _replaced(purge, spool_dir)
        with retention_lock(spool_dir, shared=False):
            # read under the lock: an instance recorded since still has its file kept
            with catalog.sessions() as session:
                listed = list(purge.paths.get("spool", []))
                live = set(session.scalars(select(Instance.path).where(Instance.path.in_(listed))))
            _remove_files(purge, spool_dir, results_dir, live | replaced)
        with catalog.sessions.begin() as session:
            row = session.get(Purge, purge.id)
            if row is not None:
                row.files_removed_at = utcnow()
    return len(pending)


Recommit = Callable[[str, list[Reference]], CommitmentAnswer]
"""(destination name, references) -> the destination's answer (its Transaction UID and each SOP
Instance UID's state)."""


class Housekeeping:
    """Retention and commitment follow-up, every ``housekeeping_interval_s``."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        *,
        recommit: Recommit | None = None,
        disk_usage: DiskUsage = disk_percent_used,
        clock: Callable[[], datetime] = utcnow,
        lease: TimerLease | None = None,
    ) -> None:
        self.catalog = catalog
        self.lease = lease  # None: this process alone keeps house
        self.options = settings.node
        self.spool_dir = settings.node.spool_dir
        self.results_dir = settings.node.data_dir / "results"
        self.recommit = recommit
        self.disk_usage = disk_usage
        self.clock = clock
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def start(self) -> None:
        self._scheduler.add_job(
            self.run_once,
            "interval",
            seconds=self.options.housekeeping_interval_s,
            id="housekeeping",
            coalesce=True,
            max_instances=1,
        )
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def run_once(self) -> HousekeepingReport:
        """One pass; on a node of a group that does not hold the timer lease, none."""
        report = HousekeepingReport()
        if self.lease is not None and not self.lease.owned():
            return report
        try:
            report.finished = finish_purges(self.catalog, self.spool_dir, self.results_dir)
            report.recommitted = self._recommit()
            report.purged = self._retain()
            report.steps_expired = self._expire_steps()
            report.nodes_pruned = self._prune_nodes()
        except Exception:  # the schedule must outlive a bad moment of the database or disk
            log.exception("housekeeping pass failed; trying again at the next one")
        if (
            report.purged
            or report.finished
            or report.recommitted
            or report.steps_expired
            or report.nodes_pruned
        ):
            log.info(
                "housekeeping",
                extra={
                    "purged": len(report.purged),
                    "finished": report.finished,
                    "recommitted": report.recommitted,
                    "steps_expired": report.steps_expired,
                    "nodes_pruned": report.nodes_pruned,
                },
            )
        return report

    def _expire_steps(self) -> int:
        """Performed procedure steps whose study never came (``mpps_retention_days``), or
        never ended (``max_wait_s`` more): the step tables must not grow without bound."""
        now = self.clock()
        retention = timedelta(days=self.options.mpps_retention_days)
        with self.catalog.sessions.begin() as session:
            if self.lease is not None and not self.lease.held(session):
                return 0
            return expire_steps(
                session,
                absent_before=now - retention,
                open_before=now - retention - timedelta(seconds=self.options.max_wait_s),
            )

    def _prune_nodes(self) -> int:
        """Registrations of nodes gone from the group for good (no heartbeat for
        ``NODE_RETENTION``): ``status`` and ``/metrics`` would list them for ever."""
        with self.catalog.sessions.begin() as session:
            if self.lease is not None and not self.lease.held(session):
                return 0
            return nodes.prune(session, NODE_RETENTION)

    def _retain(self) -> list[str]:
        days, percent = self.options.retention_days, self.options.retention_disk_percent
        if not days and not percent:
            return []
        now = self.clock()
        purged: list[str] = []
        with self.catalog.sessions() as session:
            candidates = [
                (s.id, s.study_uid, s.last_received_at) for s in eligible_studies(session)
            ]
        for study_id, study_uid, last in candidates:
            if days and last <= now - timedelta(days=days):
                reason = REASON_DAYS
            elif percent and self.disk_usage(self.options.data_dir) > percent:
                reason = REASON_DISK
            else:
                continue
            if self._purge(study_id, reason, now, last):
                purged.append(study_uid)
        return purged

    def _purge(self, study_id: int, reason: str, now: datetime, selected_last: datetime) -> bool:
        with (
            retention_lock(self.spool_dir, shared=False),
            self.catalog.sessions.begin() as session,
        ):
            if self.lease is not None and not self.lease.held(session):
                return False  # handed over since the pass began: the new owner decides
            lock_for_write(session)  # before the study is read: see purge_study
            study = session.get(Study, study_id)
            audited = study_object(session, study.study_uid) if study is not None else None
            purge = (
                purge_study(session, study, reason, now, selected_last=selected_last)
                if study is not None
                else None
            )
            if purge is not None and audited is not None:
                # audited in the purge's own transaction; the audit table itself is never
                # among what retention removes
                event = audit_events.study_deleted(str(HOUSEKEEPING), audited, reason)
                add_events_within(session, [event])  # a savepoint: never undoes the purge
        if purge is None:
            return False
        finish_purges(self.catalog, self.spool_dir, self.results_dir)
        return True

    def _recommit(self) -> int:
        """Ask again for commitment of delivered rows still ``requested``."""
        if self.recommit is None:
            return 0
        with self.catalog.sessions() as session:
            rows = session.execute(
                select(
                    Delivery.id, Delivery.destination, Result.sop_class_uid, Result.sop_instance_uid
                )
                .join(Result, Result.id == Delivery.result_id)
                .where(
                    Delivery.state == DeliveryState.DELIVERED,
                    Delivery.commitment == Commitment.REQUESTED.value,
                )
            ).all()
        by_destination: dict[str, list[tuple[int, Reference]]] = {}
        for delivery_id, destination, sop_class, sop_uid in rows:
            if sop_class and sop_uid:
                by_destination.setdefault(destination, []).append(
                    (delivery_id, Reference(sop_class, sop_uid))
                )
        confirmed = 0
        for destination, items in by_destination.items():
            answer = self.recommit(destination, [ref for _, ref in items])
            now = self.clock()
            with self.catalog.sessions.begin() as session:
                for delivery_id, ref in items:
                    found = answer.states.get(ref.sop_instance_uid)
                    state = None if found is None else found.value
                    row = session.get(Delivery, delivery_id)
                    if row is None or state is None:
                        continue
                    if state == Commitment.REQUESTED.value:
                        # a report may come later on an association of the PACS's own
                        row.commitment_uid = answer.transaction_uid or row.commitment_uid
                        continue
                    if state != Commitment.FAILED.value:
                        confirmed += 1
                    reason = answer.reasons.get(ref.sop_instance_uid, "storage commitment failed")
                    settle_commitment(row, state, now, reason)
        return confirmed
