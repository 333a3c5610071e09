"""Jobs: queue a study for processing, list jobs, cancel and retry them, run the queue here.

A job queued here and one routing queues on a stable study go through the same
:func:`pacs_node.catalog.jobs.queue_job`, with the series the router's own selection picks, so
the two differ only in the actor their ``queued`` event names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from pacs_node.actor import Actor
from pacs_node.catalog import jobs as job_rows
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.jobs import JobSummary
from pacs_node.catalog.models import Study
from pacs_node.config import Settings
from pacs_node.errors import NotFound, RequestError
from pacs_node.inference.registry import Registry
from pacs_node.ingest.spool import Spool
from pacs_node.routing.facts import study_facts
from pacs_node.routing.plan import DEFAULT_SEND
from pacs_node.routing.rules import (
    Conditions,
    RouteRule,
    Selection,
    SeriesFacts,
    TextCondition,
    evaluate_rule,
    route,
)
from pacs_node.services.audit import audit_operation

BY_HAND = "by-hand"  # the name of the rule a by-hand choice is made with (never stored)
BY_HAND_SELECTION = Selection.MOST_SLICES  # a model named with no rule: its largest series


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One job to queue: a model on series, the rule that chose it (None: by hand) and where
    its outputs go."""

    model: str
    rule: str | None
    series_uids: tuple[str, ...]
    send: Mapping[str, Sequence[str]]


def choose_jobs(
    settings: Settings,
    facts: Sequence[SeriesFacts],
    model: str | None = None,
    series: Sequence[str] = (),
) -> list[JobRequest]:
    """What to queue for a study: each matching rule's models on the series it selected,
    narrowed to ``model`` and ``series`` when given. A ``model`` no matching rule names runs
    on ``series``, or else on the series the router's selection picks among those of the
    model's modalities (:data:`BY_HAND_SELECTION`)."""
    rules = {rule.name: rule for rule in settings.routes.rules}
    chosen: list[JobRequest] = []
    for verdict in route(settings.routes, facts):
        if not verdict.matched:
            continue
        rule = rules[verdict.rule]
        for name in rule.models:
            if model is None or name == model:
                uids = tuple(series) or verdict.selected
                chosen.append(JobRequest(name, rule.name, uids, rule.send or DEFAULT_SEND))
    if chosen or model is None:
        return chosen
    if series:
        return [JobRequest(model, None, tuple(series), DEFAULT_SEND)]
    modalities = Registry(settings.node.models_dir).get(model).modalities
    when = Conditions()
    if modalities:
        when = Conditions(modality=TextCondition(match=tuple(re.escape(m) for m in modalities)))
    by_hand = RouteRule(name=BY_HAND, when=when, select=BY_HAND_SELECTION, models=(model,))
    verdict = evaluate_rule(by_hand, facts)
    if not verdict.matched:
        return []
    return [JobRequest(model, None, verdict.selected, DEFAULT_SEND)]


def queue_processing(
    catalog: Catalog,
    settings: Settings,
    study_uid: str,
    actor: Actor,
    *,
    model: str | None = None,
    series: Sequence[str] = (),
) -> list[int]:
    """Queue a received study by hand (see :func:`choose_jobs`); the new job ids. Raises
    :class:`NotFound` when there is no such study, :class:`RequestError` when a series is not
    the study's or nothing fits, and the registry's error for an unknown model."""
    if model is not None:
        Registry(settings.node.models_dir).get(model)
    with catalog.sessions.begin() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            raise NotFound(f"no study {study_uid} in the catalog")
        others = sorted(set(series) - {s.series_uid for s in study.series})
        if others:
            raise RequestError(f"series {', '.join(others)} not in study {study_uid}")
        facts = study_facts(session, Spool(settings.node.spool_dir), study_uid)
        requests = choose_jobs(settings, facts, model, series)
        if not requests:
            raise RequestError(f"nothing to run for {study_uid}: no rule or series fits")
        queued = [
            job_rows.queue_job(
                session, study.id, r.model, r.series_uids, r.send, rule=r.rule, actor=actor
            )
            for r in requests
        ]
    audit_operation(
        catalog, actor, "rerun", study_uid=study_uid, detail=f"queued {len(queued)} job(s)"
    )
    return queued


def process_now(catalog: Catalog, settings: Settings, *, label: str, deliver: bool = False) -> None:
    """Run the queue in this process until it is empty (``label`` names the worker in the
    jobs' claims); ``deliver``: then send what is due, once."""
    from pacs_node.worker import run_burst

    run_burst(catalog, settings, label=label)
    if deliver:
        from pacs_node.dispatch.outbox import Outbox

        outbox = Outbox(catalog, settings)
        try:
            outbox.dispatch_due(wait=True)
        finally:
            outbox.stop()


def list_jobs(catalog: Catalog, job_ids: Sequence[int] | None = None) -> list[JobSummary]:
    """Jobs (all, or those of ``job_ids``) with state, stage, attempts, timings, quality."""
    with catalog.sessions() as session:
        return job_rows.list_jobs(session, job_ids)


def cancel_job(catalog: Catalog, job_id: int, actor: Actor) -> bool:
    """queued | running -> cancelled; False when the job is in neither state (or missing)."""
    with catalog.sessions.begin() as session:
        done = job_rows.cancel_job(session, job_id, actor)
    audit_operation(catalog, actor, "cancel", job_id=job_id, ok=done)
    return done


def retry_job(catalog: Catalog, job_id: int, actor: Actor) -> bool:
    """failed | cancelled -> queued; False when the job is in neither state (or missing)."""
    with catalog.sessions.begin() as session:
        done = job_rows.retry_job(session, job_id, actor)
    audit_operation(catalog, actor, "retry", job_id=job_id, ok=done)
    return done
