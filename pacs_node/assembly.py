"""Study assembly: a study is ``stable`` once no instance arrived for its quiet period, or once
its max wait has passed since it started receiving, or as soon as the scanner said it is done:
every Modality Performed Procedure Step of the study COMPLETED (none IN PROGRESS) and every
instance they list in the catalog, whichever comes last. A step's N-SET and the arrival of
instances of a study with a completed step both call for an immediate check; if the listed
instances never come, the quiet period (or max wait) decides as before.

Timers are APScheduler jobs keyed by Study Instance UID, an in-memory cache of what the catalog
says: at start they are rebuilt from every study still ``receiving``, and a timer that fires
re-reads the catalog and only marks the study stable with a compare-and-set, so a late instance
can never be lost in a race.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from pacs_node.catalog.clock import db_now
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import utcnow
from pacs_node.catalog.mpps import step_progress, studies_with_completed_steps
from pacs_node.catalog.studies import StudyTouch, mark_stable, receiving_studies, stability_deadline
from pacs_node.config import Settings
from pacs_node.timer_lease import TimerLease

log = logging.getLogger(__name__)

StableListener = Callable[[str], None]
SWEEP_S = 30.0  # how often studies catalogued by other processes are looked for
SWEEP_JOB = "assembly-sweep"


class Assembly:
    def __init__(
        self, catalog: Catalog, settings: Settings, lease: TimerLease | None = None
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.lease = lease  # None: this process alone runs the timers
        # Studies another node of the group recorded are found by this sweep.
        self.sweep_s = min(SWEEP_S, settings.node.timer_lease_s / 3)
        self.max_wait_s = settings.node.max_wait_s
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._listeners: list[StableListener] = []
        self._sweep_listeners: list[Callable[[], object]] = []

    def add_sweep_listener(self, listener: Callable[[], object]) -> None:
        """Called after each sweep by the timer owner: a study whose routing was missed (the
        lease lapsed for a moment, a listener failed) is taken up again within a sweep."""
        self._sweep_listeners.append(listener)

    def add_listener(self, listener: StableListener) -> None:
        """Called with the Study Instance UID each time a study becomes stable."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._scheduler.start()
        with self.catalog.sessions() as session:
            pending = receiving_studies(session)
        self.on_touched(pending)
        if pending:
            log.info("assembly timers rebuilt", extra={"studies": len(pending)})
        self._scheduler.add_job(
            self.sweep,
            "interval",
            seconds=self.sweep_s,
            id=SWEEP_JOB,
            coalesce=True,
            max_instances=1,
        )

    def sweep(self) -> int:
        """Arm a timer for every receiving study that has none: a study another process
        catalogued (``pacs-node quarantine release``, another node of the group) is assembled
        like any other. A node without the timer lease arms none."""
        if not self._scheduler.running or (self.lease is not None and not self.lease.owned()):
            return 0
        try:
            with self.catalog.sessions() as session:
                pending = receiving_studies(session)
        except Exception:
            log.warning("assembly sweep cannot read the catalog", exc_info=True)
            return 0
        missing = [t for t in pending if self._scheduler.get_job(t.study_uid) is None]
        self.on_touched(missing)
        # A step another node of the group recorded was told to that node's assembly only.
        armed = {t.study_uid for t in missing}
        self._check_completed_steps([t for t in pending if t.study_uid not in armed])
        for listener in self._sweep_listeners:
            try:
                listener()
            except Exception:
                log.exception("assembly sweep listener failed")
        return len(missing)

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def on_touched(self, touches: Sequence[StudyTouch]) -> None:
        """Re-arm the timer of every study that just received instances."""
        for touch in touches:
            quiet = self.settings.quiet_period_for(touch.calling_ae)
            deadline = min(
                touch.last_received_at + timedelta(seconds=quiet),
                touch.receiving_since + timedelta(seconds=self.max_wait_s),
            )
            if touch.reopened:
                log.info("study changed after it was stable", extra={"study_uid": touch.study_uid})
            # The deadline is by the database's clock on PostgreSQL, the timer runs by this
            # process's: a clock behind the database's must not fire it late, so it fires within
            # a quiet period at most, and the check re-arms it by the database's clock.
            local_cap = utcnow() + timedelta(seconds=quiet)
            self._arm(touch.study_uid, quiet, min(deadline, local_cap))
        self._check_completed_steps(touches)

    def _check_completed_steps(self, touches: Sequence[StudyTouch]) -> None:
        """Check at once the studies with a completed performed procedure step: the
        instances just recorded may be the last ones it listed."""
        if not touches or not self.settings.mpps_offered():
            return
        try:
            with self.catalog.sessions() as session:
                done = studies_with_completed_steps(session, (t.study_uid for t in touches))
        except Exception:  # the quiet period still ends these studies
            log.warning("performed procedure steps not read", exc_info=True)
            return
        for touch in touches:
            if touch.study_uid in done:
                quiet = self.settings.quiet_period_for(touch.calling_ae)
                self._arm(touch.study_uid, quiet, utcnow())

    def on_step(self, study_uid: str) -> None:
        """A performed procedure step of ``study_uid`` changed: check the study now (through
        the same guarded :meth:`check` as a timer). A study not received yet has no timer;
        its instances' arrival checks it. Never raises (it runs in the SCP's threads)."""
        try:
            job = self._scheduler.get_job(study_uid) if self._scheduler.running else None
            if job is not None:
                self._arm(study_uid, float(job.args[1]), utcnow())
        except Exception:
            log.exception("assembly check not scheduled", extra={"study_uid": study_uid})

    def _arm(self, study_uid: str, quiet_period_s: float, when: datetime) -> None:
        self._scheduler.add_job(
            self._fire,
            "date",
            run_date=when,
            args=[study_uid, quiet_period_s],
            id=study_uid,
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
        )

    def _fire(self, study_uid: str, quiet_period_s: float) -> None:
        try:
            self.check(study_uid, quiet_period_s)
        except Exception:
            log.exception("assembly check failed; retrying", extra={"study_uid": study_uid})
            self._arm(study_uid, quiet_period_s, utcnow() + timedelta(seconds=5))

    def check(self, study_uid: str, quiet_period_s: float, now: datetime | None = None) -> bool:
        """Mark ``study_uid`` stable if its deadline has passed; re-arm otherwise."""
        with self.catalog.sessions.begin() as session:
            if self.lease is not None and not self.lease.held(session):
                return False  # the owner's sweep arms it; this node's takeover does too
            # Arrival times are the database's clock on PostgreSQL: compare with the same.
            now = now or db_now(session)
            found = stability_deadline(session, study_uid, quiet_period_s, self.max_wait_s)
            if found is None:
                return False
            deadline, reason = found
            if deadline > now:
                progress = step_progress(session, study_uid)
                if progress is not None and progress.ready:
                    deadline, reason = now, "performed procedure step completed"
            if deadline > now:  # re-armed by this process's clock, however far it is off
                self._arm(study_uid, quiet_period_s, utcnow() + (deadline - now))
                return False
            if not mark_stable(session, study_uid, now, reason):
                return False
        log.info("study stable", extra={"study_uid": study_uid, "reason": reason})
        for listener in self._listeners:
            listener(study_uid)
        return True
