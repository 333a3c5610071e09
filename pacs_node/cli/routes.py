"""``pacs-node routes check``, ``routes explain STUDY_UID`` and ``routes test PATH...``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pacs_node.cli.common import settings_for
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.config import Settings
from pacs_node.errors import PacsNodeError

routes_app = typer.Typer(
    help="Check the routing rules, explain how a study was routed, test them on files."
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Folder with routes.yaml.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only.")]


def _load(config: Path | None) -> Settings:
    return settings_for(config, node_logging=False)


@routes_app.command("check")
def check(config: ConfigOption = None) -> None:
    """Validate routes.yaml and that every model it names is installed."""
    from pacs_node.routing.router import check_models

    settings = _load(config)
    try:
        check_models(settings)
    except PacsNodeError as exc:
        fail(str(exc), FAILED)
    enabled = sum(rule.enabled for rule in settings.routes.rules)
    out.print(f"routes ok: {len(settings.routes.rules)} rules, {enabled} enabled", highlight=False)


@routes_app.command("explain")
def explain(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Say, for each rule and series, why it did or did not match, and what was queued."""
    from sqlalchemy import select
    from sqlalchemy.exc import NoResultFound

    from pacs_node.catalog.db import open_catalog
    from pacs_node.catalog.models import Job, Study
    from pacs_node.ingest.spool import Spool
    from pacs_node.routing.report import JobLine, StudyReport, render
    from pacs_node.routing.router import Router

    settings = _load(config)
    try:
        catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
    except PacsNodeError as exc:
        fail(str(exc), FAILED)
    router = Router(catalog, Spool(settings.node.spool_dir), settings.routes)
    try:
        with catalog.sessions() as session:
            verdicts = router.explain(session, study_uid)
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            jobs = tuple(
                JobLine(job.rule, job.model, tuple(json.loads(job.series_uids)))
                for job in session.scalars(
                    select(Job).where(Job.study_id == study.id).order_by(Job.id)
                )
            )
            outcome = study.route_outcome.value if study.route_outcome else None
    except NoResultFound:
        fail(f"no study {study_uid}", FAILED)
    finally:
        catalog.dispose()
    report = StudyReport(study_uid, tuple(verdicts), outcome, jobs)
    if json_output:
        print_json(report.as_json(), ascii_only=True)
        return
    render(out, report, planned=False, heading=False)


# Notes on skipped files shown one by one; beyond this, a count.
_SKIPPED_SHOWN = 20


@routes_app.command("test")
def try_on_files(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (read recursively).")],
    config: ConfigOption = None,
    calling_ae: Annotated[
        str | None,
        typer.Option("--calling-ae", help="The AE title the files would come from."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Say what the routes would do with DICOM files, as if the node had received them: each
    rule's verdict and why, and the jobs it would queue. Reads headers only."""
    from pacs_node.routing.files import read_studies
    from pacs_node.routing.plan import plan_study
    from pacs_node.routing.report import StudyReport, job_lines, render

    settings = _load(config)
    studies, skipped = read_studies(paths, calling_ae)
    for note in skipped[:_SKIPPED_SHOWN]:
        err.print(f"skipped {note.path}: {note.reason}", highlight=False, soft_wrap=True)
    if len(skipped) > _SKIPPED_SHOWN:
        err.print(f"skipped {len(skipped) - _SKIPPED_SHOWN} more files", highlight=False)
    if not studies:
        fail("no DICOM instances found", FAILED)
    reports = []
    for study in studies:
        decided = plan_study(settings.routes, study.series)
        reports.append(
            StudyReport(
                study.study_uid, decided.verdicts, decided.outcome.value, job_lines(decided.jobs)
            )
        )
    if json_output:
        print_json([r.as_json() for r in reports], ascii_only=True)
        return
    for index, report in enumerate(reports):
        if index:
            out.print()
        render(out, report, planned=True, heading=True)
