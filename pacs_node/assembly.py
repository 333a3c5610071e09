"""Study assembly: a study is ``stable`` once no instance arrived for its quiet period, or once
its max wait has passed since it started receiving, or as soon as the scanner said it is done:
every Modality Performed Procedure Step of the study COMPLETED (none IN PROGRESS) and every
instance they list in the catalog, whichever comes last. A step's N-SET and the arrival of
instances of a study with a completed step both call for a check within
:data:`STEP_CHECK_DELAY_S` (checks asked for meanwhile are one); if the listed instances never
come, the quiet period (or max wait) decides as before. Which studies have a completed step is
an in-memory hint (filled by :meth:`Assembly.on_step` and the sweep), so that a batch of
instances costs no query; the check itself reads the catalog, which stays the truth.

Timers are APScheduler jobs keyed by Study Instance UID, an in-memory cache of what the catalog
says: at start they are rebuilt from every study still ``receiving``, and a timer that fires
re-reads the catalog and only marks the study stable with a compare-and-set, so a late instance
can never be lost in a race.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from pacs_node.catalog.clock import db_now
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import Study, utcnow
from pacs_node.catalog.mpps import step_progress, studies_with_completed_steps
from pacs_node.catalog.studies import StudyTouch, mark_stable, receiving_studies, stability_deadline
from pacs_node.config import Settings
from pacs_node.timer_lease import TimerLease

log = logging.getLogger(__name__)

StableListener = Callable[[str], None]
SWEEP_S = 30.0  # how often studies catalogued by other processes are looked for
SWEEP_JOB = "assembly-sweep"
# A check a step or a batch of instances asks for runs this much later: a scanner's images come
# in many batches, and the checks asked for meanwhile are one.
STEP_CHECK_DELAY_S = 0.3


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
        # Study UID -> when (monotonic) it was learned to have an ended step: a hint that its
        # instances may be the last ones a step lists. Kept by the sweep, dropped once stable.
        self._stepped: dict[str, float] = {}
        self._stepped_lock = threading.Lock()

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
        self._sweep_steps(pending)
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
        """Re-arm the timer of every study that just received instances. One known to have an
        ended step is checked soon instead (the instances may be the last ones it listed; a
        check already due sooner is kept, so a stream of batches is not checked each time,
        nor pushed back); the check re-arms the quiet period. No query here: this runs for
        every batch the recorder writes."""
        for touch in touches:
            quiet = self.settings.quiet_period_for(touch.calling_ae)
            if touch.reopened:
                log.info("study changed after it was stable", extra={"study_uid": touch.study_uid})
            if touch.study_uid in self._stepped:
                self._arm_soon(touch.study_uid, quiet)
                continue
            deadline = min(
                touch.last_received_at + timedelta(seconds=quiet),
                touch.receiving_since + timedelta(seconds=self.max_wait_s),
            )
            # The deadline is by the database's clock on PostgreSQL, the timer runs by this
            # process's: a clock behind the database's must not fire it late, so it fires within
            # a quiet period at most, and the check re-arms it by the database's clock.
            local_cap = utcnow() + timedelta(seconds=quiet)
            self._arm(touch.study_uid, quiet, min(deadline, local_cap))

    def _sweep_steps(self, pending: Sequence[StudyTouch]) -> None:
        """Refresh the hint from the catalog: the receiving studies with a completed step (a
        study newly found is checked soon), and those told by :meth:`on_step` lately (a step
        may come before its study's first instance)."""
        if not self.settings.mpps_offered():
            return
        try:
            with self.catalog.sessions() as session:
                done = studies_with_completed_steps(session, (t.study_uid for t in pending))
        except Exception:  # the quiet period still ends these studies
            log.warning("performed procedure steps not read", exc_info=True)
            return
        now = time.monotonic()
        with self._stepped_lock:
            new = done.difference(self._stepped)
            kept = {
                uid: at
                for uid, at in self._stepped.items()
                if uid in done or now - at < self.max_wait_s
            }
            kept.update((uid, now) for uid in new)
            self._stepped = kept
        for touch in pending:
            if touch.study_uid in new:
                self._arm_soon(touch.study_uid, self.settings.quiet_period_for(touch.calling_ae))

    def on_step(self, study_uid: str) -> None:
        """A performed procedure step of ``study_uid`` ended (COMPLETED or DISCONTINUED):
        check the study soon, through the same guarded :meth:`check` as a timer, whether or
        not a timer is pending (one running right now has left the scheduler), and check it
        again as its instances arrive. A study not received yet is not found by the check;
        its instances' arrival checks it. Never raises (it runs in the SCP's threads)."""
        try:
            with self._stepped_lock:
                self._stepped[study_uid] = time.monotonic()
            if not self._scheduler.running:
                return
            job = self._scheduler.get_job(study_uid)
            self._arm_soon(study_uid, None if job is None else float(job.args[1]))
        except Exception:
            log.exception("assembly check not scheduled", extra={"study_uid": study_uid})

    def _arm_soon(self, study_uid: str, quiet_period_s: float | None) -> None:
        """Arm a check :data:`STEP_CHECK_DELAY_S` from now, unless one is due sooner."""
        when = utcnow() + timedelta(seconds=STEP_CHECK_DELAY_S)
        job = self._scheduler.get_job(study_uid)
        due = getattr(job.trigger, "run_date", None) if job is not None else None
        if due is not None and due <= when:
            return
        if quiet_period_s is None and job is not None:
            quiet_period_s = job.args[1]
        self._arm(study_uid, quiet_period_s, when)

    def _arm(self, study_uid: str, quiet_period_s: float | None, when: datetime) -> None:
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

    def _fire(self, study_uid: str, quiet_period_s: float | None) -> None:
        try:
            self.check(study_uid, quiet_period_s)
        except Exception:
            log.exception("assembly check failed; retrying", extra={"study_uid": study_uid})
            self._arm(study_uid, quiet_period_s, utcnow() + timedelta(seconds=5))

    def check(
        self, study_uid: str, quiet_period_s: float | None, now: datetime | None = None
    ) -> bool:
        """Mark ``study_uid`` stable if its deadline has passed; re-arm otherwise.
        ``quiet_period_s`` None: that of the AE the study came from."""
        with self.catalog.sessions.begin() as session:
            if self.lease is not None and not self.lease.held(session):
                return False  # the owner's sweep arms it; this node's takeover does too
            if quiet_period_s is None:
                sender = session.scalar(
                    select(Study.calling_ae).where(Study.study_uid == study_uid)
                )
                quiet_period_s = self.settings.quiet_period_for(sender)
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
        with self._stepped_lock:  # its steps are spent: a reopened study waits its quiet period
            self._stepped.pop(study_uid, None)
        log.info("study stable", extra={"study_uid": study_uid, "reason": reason})
        for listener in self._listeners:
            listener(study_uid)
        return True
