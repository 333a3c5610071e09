"""``pacs-node jobs`` (list, retry, cancel) and ``run``: the job queue by hand.

JSON goes alone to stdout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.catalog.models import Study
from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.config import Settings

jobs_app = typer.Typer(
    help="Jobs: list them, retry a failed one, cancel a queued or running one.",
    invoke_without_command=True,
    no_args_is_help=False,
)
JobArgument = Annotated[int, typer.Argument(help="Job ID.")]


@jobs_app.callback()
def jobs(ctx: typer.Context, config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List jobs with state, stage, progress, attempts and stage timings."""
    if ctx.invoked_subcommand is not None:
        return
    from pacs_node.catalog.jobs import list_jobs

    settings = settings_for(config)
    with opened_catalog(settings, migrate=True) as catalog, catalog.sessions() as session:
        summaries = list_jobs(session)
    if json_output:
        print_json([s.as_json() for s in summaries])
        return
    table = Table(title=f"{len(summaries)} jobs")
    columns = ("ID", "Study", "Model", "Rule", "State", "Stage", "Tries", "Seconds", "Quality")
    for column in (*columns, "Error"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            str(s.id),
            s.study_uid,
            s.model,
            s.rule or "(by hand)",
            s.state,
            f"{s.stage or ''} {s.progress:.0%}".strip(),
            str(s.attempts),
            f"{s.timings.get('total_s', 0.0):.1f}",
            s.quality_text[:120],
            (s.error or "")[:60],
        )
    out.print(table)


def transition(
    config: ConfigOption,
    what: str,
    row_id: int,
    action: Callable[[Session, int], bool],
    allowed: str,
) -> None:
    """Apply one state change by hand; one the row's state does not allow ends in error."""
    settings = settings_for(config)
    with opened_catalog(settings, migrate=True) as catalog, catalog.sessions.begin() as session:
        changed = action(session, row_id)
    if not changed:
        fail(f"{what} {row_id}: no such {what} {allowed}", FAILED)
    err.print(f"{what} {row_id}: done", highlight=False)


@jobs_app.command("retry")
def jobs_retry(job_id: JobArgument, config: ConfigOption = None) -> None:
    """Queue a failed or cancelled job again."""
    from pacs_node.catalog.jobs import retry_job

    transition(config, "job", job_id, retry_job, "that is failed or cancelled")


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArgument, config: ConfigOption = None) -> None:
    """Cancel a queued or running job (a running one stops at its next stage)."""
    from pacs_node.catalog.jobs import cancel_job

    transition(config, "job", job_id, cancel_job, "that is queued or running")


Plan = tuple[str, str | None, list[str], dict[str, list[str]]]


def _choose(
    session: Session, settings: Settings, study: Study, model: str | None, series: list[str]
) -> list[Plan]:
    """(model, rule, series, destinations) to queue: the routes' choice, narrowed by the
    options; with ``--model`` and no matching rule, the largest series the model takes."""
    from pacs_node.catalog.models import Instance, Series
    from pacs_node.inference.registry import Registry
    from pacs_node.ingest.spool import Spool
    from pacs_node.routing.facts import study_facts
    from pacs_node.routing.router import DEFAULT_SEND
    from pacs_node.routing.rules import route

    rules = {rule.name: rule for rule in settings.routes.rules}
    facts = study_facts(session, Spool(settings.node.spool_dir), study.study_uid)
    chosen: list[Plan] = []
    for verdict in route(settings.routes, facts):
        if not verdict.matched:
            continue
        send = {k: list(v) for k, v in (rules[verdict.rule].send or DEFAULT_SEND).items()}
        for name in rules[verdict.rule].models:
            if model is None or name == model:
                chosen.append((name, verdict.rule, series or list(verdict.selected), send))
    if chosen or model is None:
        return chosen
    send = {k: list(v) for k, v in DEFAULT_SEND.items()}
    if series:
        return [(model, None, series, send)]
    modalities = set(Registry(settings.node.models_dir).get(model).modalities)
    counts = session.execute(
        select(Series.series_uid, Series.modality, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.series_uid, Series.modality)
    ).all()
    usable = [(n, uid) for uid, modality, n in counts if not modalities or modality in modalities]
    if not usable:
        return []
    return [(model, None, [max(usable)[1]], send)]


def run(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID of a received study.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model to run (default: what the routes say).")
    ] = None,
    series: Annotated[
        list[str] | None, typer.Option("--series", help="Series to process (repeatable).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Run the queue here until it is empty.")
    ] = False,
    deliver: Annotated[
        bool, typer.Option("--deliver", help="With --wait: also send what is due, once.")
    ] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Queue a study for processing by hand; ``--wait`` runs it in this process."""
    from pacs_node.catalog.jobs import list_jobs, queue_job
    from pacs_node.errors import PacsNodeError

    settings = settings_for(config)
    with opened_catalog(settings, migrate=True) as catalog:
        with catalog.sessions.begin() as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
            if study is None:
                fail(f"no study {study_uid} in the catalog", FAILED)
            try:
                plans = _choose(session, settings, study, model, list(series or []))
            except PacsNodeError as exc:
                fail(str(exc), FAILED)
            if not plans:
                fail(f"nothing to run for {study_uid}: no rule or series fits", FAILED)
            job_ids = [
                queue_job(session, study.id, name, uids, send, rule=rule, by="user")
                for name, rule, uids, send in plans
            ]
        err.print(f"queued job(s) {', '.join(map(str, job_ids))}", highlight=False)
        if wait:
            from pacs_node.worker import run_burst

            run_burst(catalog, settings, label="cli")
            if deliver:
                from pacs_node.dispatch.outbox import Outbox

                outbox = Outbox(catalog, settings)
                try:
                    outbox.dispatch_due(wait=True)
                finally:
                    outbox.stop()
        with catalog.sessions() as session:
            summaries = list_jobs(session, job_ids)
    if json_output:
        print_json([s.as_json() for s in summaries])
    else:
        for s in summaries:
            err.print(f"job {s.id} {s.model}: {s.state} {s.error or ''}".strip(), highlight=False)
    if wait and any(s.state == "failed" for s in summaries):
        raise typer.Exit(FAILED)
