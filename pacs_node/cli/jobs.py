"""``pacs-node jobs`` (list, retry, cancel) and ``run``: the job queue by hand.

JSON goes alone to stdout.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import (
    ConfigOption,
    JsonOption,
    change,
    opened_catalog,
    settings_for,
    user,
)
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.errors import PacsNodeError

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
    from pacs_node.services.jobs import list_jobs

    with opened_catalog(settings_for(config), migrate=True) as catalog:
        summaries = list_jobs(catalog)
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


@jobs_app.command("retry")
def jobs_retry(job_id: JobArgument, config: ConfigOption = None) -> None:
    """Queue a failed or cancelled job again."""
    from pacs_node.services.jobs import retry_job

    if not change(config, lambda catalog: retry_job(catalog, job_id, user())):
        fail(f"job {job_id}: no such job that is failed or cancelled", FAILED)
    err.print(f"job {job_id}: done", highlight=False)


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArgument, config: ConfigOption = None) -> None:
    """Cancel a queued or running job (a running one stops at its next stage)."""
    from pacs_node.services.jobs import cancel_job

    if not change(config, lambda catalog: cancel_job(catalog, job_id, user())):
        fail(f"job {job_id}: no such job that is queued or running", FAILED)
    err.print(f"job {job_id}: done", highlight=False)


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
    from pacs_node.services.jobs import list_jobs, process_now, queue_processing

    settings = settings_for(config)
    with opened_catalog(settings, migrate=True) as catalog:
        try:
            job_ids = queue_processing(
                catalog, settings, study_uid, user(), model=model, series=series or ()
            )
        except PacsNodeError as exc:
            fail(str(exc), FAILED)
        err.print(f"queued job(s) {', '.join(map(str, job_ids))}", highlight=False)
        if wait:
            process_now(catalog, settings, label="cli", deliver=deliver)
        summaries = list_jobs(catalog, job_ids)
    if json_output:
        print_json([s.as_json() for s in summaries])
    else:
        for s in summaries:
            err.print(f"job {s.id} {s.model}: {s.state} {s.error or ''}".strip(), highlight=False)
    if wait and any(s.state == "failed" for s in summaries):
        raise typer.Exit(FAILED)
