"""When a study becomes stable: evaluate the routes and queue one job per (rule, model).

Studies no rule matches are marked ``unrouted`` (kept and listed, never dropped); objects this
node produced are never routed; a study that changed after it was processed is re-routed or left
alone as each rule's ``on_change`` says.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pacs_node.actor import ROUTING
from pacs_node.catalog.clock import db_now
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import (
    Instance,
    Job,
    RouteOutcome,
    Series,
    Study,
    StudyState,
)
from pacs_node.catalog.studies import add_event
from pacs_node.config import ENV_PREFIX, NODE_FILE, ROUTES_FILE, Settings
from pacs_node.errors import ConfigError
from pacs_node.inference.registry import ALLOWLIST_KEY, Registry
from pacs_node.ingest.spool import Spool
from pacs_node.quality.limits import limit_labels, merge_limits
from pacs_node.routing.facts import study_facts
from pacs_node.routing.plan import DEFAULT_SEND, plan_study
from pacs_node.routing.rules import RoutesFile, RuleVerdict, SeriesFacts, route
from pacs_node.timer_lease import TimerLease

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SEND", "Router", "allowlist_source", "check_models"]


def allowlist_source(settings: Settings) -> tuple[str, str]:
    """Where the model allowlist in force was set: (file or "environment", key)."""
    env = f"{ENV_PREFIX}{ALLOWLIST_KEY.upper()}"
    if os.environ.get(env):
        return "environment", env
    return str((settings.config_dir or Path(".")) / NODE_FILE), ALLOWLIST_KEY


def check_models(settings: Settings) -> None:
    """Every installed bundle must be valid and every model a rule names installed: a broken
    metadata.json or a typo stops the node at start (file, key, reason), not at the first study."""
    registry = Registry(settings.node.models_dir)
    bundles = registry.load_all()  # raises BundleError naming the file and the key
    allowed = settings.node.model_sha256_allowlist
    for bundle in bundles:
        if allowed and bundle.sha256 not in allowed:
            source, key = allowlist_source(settings)
            raise ConfigError(
                source,
                key,
                f"model bundle {bundle.root} has SHA-256 {bundle.sha256}, which is not listed: "
                "a bundle runs code, only listed ones may run",
            )
    installed = set(registry.names())
    by_name = {b.name: b for b in bundles}
    for index, rule in enumerate(settings.routes.rules):
        source = str((settings.config_dir or Path(".")) / ROUTES_FILE)
        for model in rule.models:
            if model not in installed:
                known = ", ".join(sorted(installed)) or "none"
                raise ConfigError(
                    source,
                    f"rules[{index}].models",
                    f"model {model!r} is not installed in {settings.node.models_dir} ({known})",
                )
            try:
                merged = merge_limits(by_name[model].quality, rule.qa_limits)
            except ValueError as exc:  # pydantic's names the key and the reason
                raise ConfigError(source, f"rules[{index}].qa_limits", str(exc)) from exc
            unknown = sorted(limit_labels(merged) - {s.name for s in by_name[model].segments})
            if unknown:
                raise ConfigError(
                    source,
                    f"rules[{index}].qa_limits",
                    f"model {model!r} has no label {', '.join(unknown)}",
                )


StudySnapshot = tuple[object, ...]
"""What a study's routing facts depend on: when it last became stable and last received, how
often it reopened, and how many series and instances it has."""
Prepared = tuple[StudySnapshot, list[SeriesFacts]]


def _study_state(session: Session, study_uid: str) -> StudySnapshot | None:
    row = session.execute(
        select(
            Study.id,
            Study.stable_at,
            Study.last_received_at,
            Study.reopened_count,
            select(func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == Study.id)
            .scalar_subquery(),
            select(func.count(Series.id)).where(Series.study_id == Study.id).scalar_subquery(),
        ).where(Study.study_uid == study_uid)
    ).first()
    return None if row is None else tuple(row)


class Router:
    def __init__(
        self,
        catalog: Catalog,
        spool: Spool,
        routes: RoutesFile,
        lease: TimerLease | None = None,
    ) -> None:
        self.catalog = catalog
        self.lease = lease  # None: this process alone routes
        self.spool = spool
        self.routes = routes
        self._listeners: list[Callable[[int], None]] = []

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Called with each job routing queued, once its row is committed (a job queue takes
        it at once rather than at its next poll)."""
        self._listeners.append(listener)

    def explain(self, session: Session, study_uid: str) -> list[RuleVerdict]:
        return route(self.routes, study_facts(session, self.spool, study_uid))

    def catch_up(self) -> int:
        """Route studies that became stable but were not routed since (a crash in between,
        the timer lease lapsed in between, routing failed): at start, on taking the timer
        lease, and after each of the owner's assembly sweeps."""
        if self.lease is not None and not self.lease.owned():
            return 0
        with self.catalog.sessions() as session:
            pending = list(
                session.scalars(
                    select(Study.study_uid).where(
                        Study.state == StudyState.STABLE,
                        or_(Study.routed_at.is_(None), Study.routed_at < Study.stable_at),
                    )
                )
            )
        for study_uid in pending:
            try:
                self.on_stable(study_uid)
            except Exception:  # the next catch-up tries it again
                log.exception("routing failed", extra={"study_uid": study_uid})
        return len(pending)

    def on_stable(self, study_uid: str) -> None:
        """Assembly listener: route the study that just became stable.

        What routing needs of the study is read first, outside the transaction that holds the
        timer lease and the study's row: a series the catalog recorded no headers for has
        its files read from the spool, and a slow file system must not hold those locks (nor
        run into the lease transaction's idle limit). The locked transaction uses that
        reading only if the study is still as it was read; otherwise it reads it again."""
        prepared = self._prepare(study_uid)
        with self.catalog.sessions.begin() as session:
            if self.lease is not None and not self.lease.held(session):
                log.info("study left to the timer lease's owner", extra={"study_uid": study_uid})
                return
            routed = self.route_study(session, study_uid, prepared)
        if routed is None:
            return
        outcome, jobs = routed
        log.info(
            "study routed",
            extra={"study_uid": study_uid, "outcome": outcome.value, "jobs": len(jobs)},
        )
        for job_id in jobs:
            for listener in self._listeners:
                try:
                    listener(job_id)
                except Exception:  # the job is queued; a poll takes it anyway
                    log.exception("job listener failed", extra={"job_id": job_id})

    def _prepare(self, study_uid: str) -> Prepared | None:
        """The study's routing facts and the state they were read in, in a short read-only
        transaction of its own; None when the study cannot be read (then they are read in the
        routing transaction)."""
        try:
            with self.catalog.sessions() as session:
                state = _study_state(session, study_uid)
                if state is None:
                    return None
                return state, study_facts(session, self.spool, study_uid)
        except Exception:  # read again where it counts, which reports what is wrong
            log.warning("routing facts not read ahead", extra={"study_uid": study_uid})
            return None

    def route_study(
        self, session: Session, study_uid: str, prepared: Prepared | None = None
    ) -> tuple[RouteOutcome, list[int]] | None:
        """Decide the study's outcome and queue its jobs; returns the outcome and the job ids,
        or None when it was routed since it last became stable (routed once, however many
        callers: the study row is locked to this transaction on PostgreSQL). ``prepared``:
        facts read before this transaction, used when the study is still in the state they
        were read in."""
        study = session.scalars(
            select(Study).where(Study.study_uid == study_uid).with_for_update()
        ).one()
        if (
            study.stable_at is not None
            and study.routed_at is not None
            and study.routed_at >= study.stable_at
        ):
            return None
        now = db_now(session)  # the clock stable_at was taken by
        if prepared is not None and prepared[0] == _study_state(session, study_uid):
            facts = prepared[1]
        else:
            facts = study_facts(session, self.spool, study_uid)
        own = bool(facts) and all(f.produced_by_node for f in facts)
        if not own and self._only_own_output_since_routed(session, study, facts):
            # A PACS forwarded our results back into the study: not a change worth a new job.
            add_event(session, study.id, "own output returned", now)
            study.routed_at = now
            return study.route_outcome or RouteOutcome.ROUTED, []
        earlier = frozenset(
            rule
            for rule in session.scalars(select(Job.rule).where(Job.study_id == study.id))
            if rule is not None
        )
        decided = plan_study(self.routes, facts, earlier)
        jobs = [
            queue_job(
                session,
                study.id,
                job.model,
                job.series_uids,
                job.send,
                rule=job.rule,
                actor=ROUTING,
            )
            for job in decided.jobs
        ]
        if decided.outcome is RouteOutcome.UNROUTED:
            reasons = {v.rule: v.reason for v in decided.verdicts} or {"routes": "no rules"}
            add_event(session, study.id, "unrouted", now, **reasons)
        study.route_outcome = decided.outcome
        study.routed_at = now
        return decided.outcome, jobs

    @staticmethod
    def _only_own_output_since_routed(
        session: Session, study: Study, facts: Sequence[SeriesFacts]
    ) -> bool:
        """True when the study was routed before and every instance received since then
        belongs to a series this node produced."""
        if study.routed_at is None:
            return False
        changed = set(
            session.scalars(
                select(Series.series_uid)
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id == study.id, Instance.received_at > study.routed_at)
            )
        )
        ours = {f.series_uid for f in facts if f.produced_by_node}
        return bool(changed) and changed <= ours
