"""``pacs-node jobs``, ``run``, ``deliveries`` and ``results``: the job queue, the outbox and
the quality gate's held results by hand.

Registered on the main app by :mod:`pacs_node.cli`; JSON goes alone to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import func, select

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Folder with node.yaml, peers.yaml and routes.yaml.", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only, on stdout.")]

jobs_app = typer.Typer(
    help="Jobs: list them, retry a failed one, cancel a queued or running one.",
    invoke_without_command=True,
    no_args_is_help=False,
)
deliveries_app = typer.Typer(
    help="The outbox: every result's way to every destination; retry a held or dead one.",
    invoke_without_command=True,
    no_args_is_help=False,
)

results_app = typer.Typer(
    help="Results held by the quality gate: release (send) or reject them. ID is the job id "
    "(see `pacs-node jobs`): the gate judges a job's whole result, so all its objects go or "
    "none.",
    no_args_is_help=True,
)
ActorOption = Annotated[
    str,
    typer.Option("--actor", help="Who decides, for the job's events (default: the login name)."),
]


def _open(config: Path | None) -> Any:
    """(settings, catalog) for a command; errors end the command with the reason."""
    from pacs_node.catalog.db import open_catalog, sqlite_file
    from pacs_node.cli import _fail, _settings
    from pacs_node.datadir import make_private
    from pacs_node.errors import PacsNodeError

    settings = _settings(config)
    try:
        make_private(settings.node.data_dir, sqlite_file(settings.node.catalog_url))
        return settings, open_catalog(settings.node.catalog_url)
    except (PacsNodeError, OSError) as exc:
        raise _fail(str(exc), 1) from exc


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")


@jobs_app.callback()
def jobs(ctx: typer.Context, config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List jobs with state, stage, progress, attempts and stage timings."""
    if ctx.invoked_subcommand is not None:
        return
    from pacs_node.catalog.jobs import list_jobs
    from pacs_node.cli import out

    _, catalog = _open(config)
    try:
        with catalog.sessions() as session:
            summaries = list_jobs(session)
    finally:
        catalog.dispose()
    if json_output:
        _print_json([s.as_json() for s in summaries])
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


def _transition(config: Path | None, what: str, job_id: int, action: Any, allowed: str) -> None:
    from pacs_node.cli import _fail, err

    _, catalog = _open(config)
    try:
        with catalog.sessions.begin() as session:
            changed = action(session, job_id)
    finally:
        catalog.dispose()
    if not changed:
        raise _fail(f"{what} {job_id}: no such {what} {allowed}", 1)
    err.print(f"{what} {job_id}: done", highlight=False)


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[int, typer.Argument(help="Job ID.")], config: ConfigOption = None
) -> None:
    """Queue a failed or cancelled job again."""
    from pacs_node.catalog.jobs import retry_job

    _transition(config, "job", job_id, retry_job, "that is failed or cancelled")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[int, typer.Argument(help="Job ID.")], config: ConfigOption = None
) -> None:
    """Cancel a queued or running job (a running one stops at its next stage)."""
    from pacs_node.catalog.jobs import cancel_job

    _transition(config, "job", job_id, cancel_job, "that is queued or running")


def _choose(
    session: Any, settings: Any, study: Any, model: str | None, series: list[str]
) -> list[tuple[str, str | None, list[str], dict[str, list[str]]]]:
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
    chosen: list[tuple[str, str | None, list[str], dict[str, list[str]]]] = []
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
    from pacs_node.catalog.models import Study
    from pacs_node.cli import _fail, err
    from pacs_node.errors import PacsNodeError

    settings, catalog = _open(config)
    try:
        with catalog.sessions.begin() as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
            if study is None:
                raise _fail(f"no study {study_uid} in the catalog", 1)
            try:
                plans = _choose(session, settings, study, model, list(series or []))
            except PacsNodeError as exc:
                raise _fail(str(exc), 1) from exc
            if not plans:
                raise _fail(f"nothing to run for {study_uid}: no rule or series fits", 1)
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
    finally:
        catalog.dispose()
    if json_output:
        _print_json([s.as_json() for s in summaries])
    else:
        for s in summaries:
            err.print(f"job {s.id} {s.model}: {s.state} {s.error or ''}".strip(), highlight=False)
    if wait and any(s.state == "failed" for s in summaries):
        raise typer.Exit(1)


@deliveries_app.callback()
def deliveries(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only these states (pending, sending, delivered, held, dead, rejected).",
        ),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """List deliveries: destination, state, attempts, next attempt and the last error."""
    if ctx.invoked_subcommand is not None:
        return
    from pacs_node.catalog.deliveries import list_deliveries
    from pacs_node.cli import out

    _, catalog = _open(config)
    try:
        with catalog.sessions() as session:
            rows = list_deliveries(session, states=state)
    finally:
        catalog.dispose()
    if json_output:
        _print_json([r.as_json() for r in rows])
        return
    table = Table(title=f"{len(rows)} deliveries")
    for column in ("ID", "Job", "Kind", "Destination", "State", "Tries", "Next", "Last error"):
        table.add_column(column)
    for r in rows:
        shown = f"{r.state} ({r.held_for})" if r.held_for else r.state
        table.add_row(
            str(r.id),
            str(r.job_id),
            r.kind,
            r.destination,
            shown,
            str(r.attempts),
            r.next_attempt_at.strftime("%H:%M:%S") if r.next_attempt_at else "",
            (r.last_error or "")[: 160 if r.held_for == "quality" else 60],
        )
    out.print(table)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[int, typer.Argument(help="Delivery ID.")], config: ConfigOption = None
) -> None:
    """Send a held or dead delivery again now (attempts counted afresh)."""
    from pacs_node.catalog.deliveries import retry_delivery

    _transition(
        config,
        "delivery",
        delivery_id,
        retry_delivery,
        "that is held or dead (one the quality gate holds: `pacs-node results release JOB`)",
    )


def _default_actor() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "operator"


def _decide(config: Path | None, job_id: int, action: Any, verb: str) -> None:
    from pacs_node.catalog.quality import StaleRelease
    from pacs_node.cli import _fail, err

    _, catalog = _open(config)
    try:
        with catalog.sessions.begin() as session:
            count = action(session, job_id)
    except StaleRelease as exc:
        raise _fail(str(exc), 1) from exc
    finally:
        catalog.dispose()
    if not count:
        raise _fail(f"job {job_id}: no result held by the quality gate", 1)
    err.print(f"job {job_id}: {count} deliveries {verb}", highlight=False)


@results_app.command("release")
def results_release(
    job_id: Annotated[int, typer.Argument(help="Job ID whose result is held.")],
    actor: ActorOption = "",
    config: ConfigOption = None,
) -> None:
    """Send a result the quality gate held: its deliveries become due now."""
    from pacs_node.catalog.quality import release_result

    who = actor or _default_actor()
    _decide(config, job_id, lambda s, j: release_result(s, j, who), "released")


@results_app.command("reject")
def results_reject(
    job_id: Annotated[int, typer.Argument(help="Job ID whose result is held.")],
    actor: ActorOption = "",
    reason: Annotated[str, typer.Option("--reason", help="Why, for the job's events.")] = "",
    config: ConfigOption = None,
) -> None:
    """Reject a result the quality gate held: its deliveries are never sent."""
    from pacs_node.catalog.quality import reject_result

    who = actor or _default_actor()
    _decide(config, job_id, lambda s, j: reject_result(s, j, who, reason), "rejected")


def register(app: typer.Typer) -> None:
    """Add ``jobs``, ``run``, ``deliveries`` and ``results`` to the ``pacs-node`` app."""
    app.add_typer(jobs_app, name="jobs")
    app.command()(run)
    app.add_typer(deliveries_app, name="deliveries")
    app.add_typer(results_app, name="results")
