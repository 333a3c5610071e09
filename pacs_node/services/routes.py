"""The routing rules: check them, explain how a study was routed, plan files as if received."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import Job, Study
from pacs_node.config import Settings
from pacs_node.errors import NotFound
from pacs_node.ingest.spool import Spool
from pacs_node.routing.files import Skipped, read_studies
from pacs_node.routing.plan import plan_study
from pacs_node.routing.report import JobLine, StudyReport, job_lines
from pacs_node.routing.router import Router, check_models


def check_routes(settings: Settings) -> tuple[int, int]:
    """Every model the rules name is installed and valid (raises naming file and key if
    not); (rules, enabled rules)."""
    check_models(settings)
    rules = settings.routes.rules
    return len(rules), sum(rule.enabled for rule in rules)


def explain_study(catalog: Catalog, settings: Settings, study_uid: str) -> StudyReport:
    """Each rule's verdict on the study's series and why, its routing outcome and the jobs
    queued for it; :class:`NotFound` when there is no such study."""
    router = Router(catalog, Spool(settings.node.spool_dir), settings.routes)
    with catalog.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            raise NotFound(f"no study {study_uid}")
        verdicts = router.explain(session, study_uid)
        jobs = tuple(
            JobLine(job.rule, job.model, tuple(job.series_uids))
            for job in session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id))
        )
        outcome = study.route_outcome.value if study.route_outcome else None
    return StudyReport(study_uid, tuple(verdicts), outcome, jobs)


def plan_files(
    settings: Settings, paths: Sequence[Path], calling_ae: str | None = None
) -> tuple[list[StudyReport], list[Skipped]]:
    """What the routes would do with the studies in DICOM files, as if received from
    ``calling_ae`` (headers only), and the files left out and why."""
    studies, skipped = read_studies(paths, calling_ae)
    reports = []
    for study in studies:
        decided = plan_study(settings.routes, study.series)
        reports.append(
            StudyReport(
                study.study_uid, decided.verdicts, decided.outcome.value, job_lines(decided.jobs)
            )
        )
    return reports, skipped
