"""``pacs-node routes check``, ``routes explain STUDY_UID`` and ``routes test PATH...``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.tree import Tree

from pacs_node.cli.common import opened_catalog, settings_for
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.config import Settings
from pacs_node.errors import PacsNodeError

if TYPE_CHECKING:
    from pacs_node.routing.report import StudyReport
    from pacs_node.routing.rules import RuleVerdict

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
    from pacs_node.services.routes import check_routes

    settings = _load(config)
    try:
        rules, enabled = check_routes(settings)
    except PacsNodeError as exc:
        fail(str(exc), FAILED)
    out.print(f"routes ok: {rules} rules, {enabled} enabled", highlight=False)


@routes_app.command("explain")
def explain(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Say, for each rule and series, why it did or did not match, and what was queued."""
    from pacs_node.services.routes import explain_study

    settings = _load(config)
    with opened_catalog(settings) as catalog:
        try:
            report = explain_study(catalog, settings, study_uid)
        except PacsNodeError as exc:
            fail(str(exc), FAILED)
    if json_output:
        print_json(report.as_json(), ascii_only=True)
        return
    _render(out, report, planned=False, heading=False)


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
    from pacs_node.services.routes import plan_files

    settings = _load(config)
    reports, skipped = plan_files(settings, paths, calling_ae)
    for note in skipped[:_SKIPPED_SHOWN]:
        err.print(f"skipped {note.path}: {note.reason}", highlight=False, soft_wrap=True)
    if len(skipped) > _SKIPPED_SHOWN:
        err.print(f"skipped {len(skipped) - _SKIPPED_SHOWN} more files", highlight=False)
    if not reports:
        fail("no DICOM instances found", FAILED)
    if json_output:
        print_json([r.as_json() for r in reports], ascii_only=True)
        return
    for index, report in enumerate(reports):
        if index:
            out.print()
        _render(out, report, planned=True, heading=True)


def _verdict_trees(verdicts: Sequence[RuleVerdict]) -> list[Tree]:
    """Per rule: matched or not and why; per series, each condition with its reason."""
    trees = []
    for verdict in verdicts:
        mark = "[green]matched[/]" if verdict.matched else "[red]no match[/]"
        tree = Tree(f"rule [bold]{verdict.rule}[/]: {mark} ({verdict.reason})")
        for series in verdict.series:
            chosen = " [bold green](selected)[/]" if series.series_uid in verdict.selected else ""
            branch = tree.add(f"series {series.series_uid}{chosen}")
            for check in series.checks:
                sign = "[green]✓[/]" if check.passed else "[red]✗[/]"
                branch.add(f"{sign} {check.attribute}: {check.reason}")
        trees.append(tree)
    return trees


def _render(console: Console, report: StudyReport, *, planned: bool, heading: bool) -> None:
    """Print the report; ``planned``: the jobs are what would be queued, not what was."""
    if heading:
        console.print(f"[bold]study {report.study_uid}[/]", highlight=False)
    if not report.verdicts:
        console.print("no rules: every study is unrouted", highlight=False)
    for tree in _verdict_trees(report.verdicts):
        console.print(tree, highlight=False)
    if report.outcome is None:
        console.print("outcome: not routed yet", highlight=False)
        return
    would = "would be " if planned else ""
    console.print(f"outcome: {would}{report.outcome}", highlight=False)
    for job in report.jobs:
        series = ", ".join(job.series_uids)
        verb = "would queue" if planned else "job"
        console.print(f"  {verb}: {job.rule} -> {job.model} on {series}", highlight=False)
