"""How a study's routing reads: one shape for ``routes explain`` and ``routes test``, as JSON and
as a tree, so that what a folder of files would do and what the node did look the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.tree import Tree

from pacs_node.routing.plan import PlannedJob
from pacs_node.routing.rules import RuleVerdict


@dataclass(frozen=True)
class JobLine:
    rule: str | None
    model: str
    series_uids: tuple[str, ...]


@dataclass(frozen=True)
class StudyReport:
    """Every rule's verdict on a study, the outcome and the jobs (queued, or that would be)."""

    study_uid: str
    verdicts: tuple[RuleVerdict, ...]
    outcome: str | None  # None: the node has not routed the study yet
    jobs: tuple[JobLine, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "verdicts": [asdict(v) for v in self.verdicts],
            "outcome": self.outcome,
            "jobs": [asdict(j) for j in self.jobs],
        }


def job_lines(jobs: Sequence[PlannedJob]) -> tuple[JobLine, ...]:
    return tuple(JobLine(j.rule, j.model, j.series_uids) for j in jobs)


def verdict_trees(verdicts: Sequence[RuleVerdict]) -> list[Tree]:
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


def render(console: Console, report: StudyReport, *, planned: bool, heading: bool) -> None:
    """Print the report; ``planned``: the jobs are what would be queued, not what was."""
    if heading:
        console.print(f"[bold]study {report.study_uid}[/]", highlight=False)
    if not report.verdicts:
        console.print("no rules: every study is unrouted", highlight=False)
    for tree in verdict_trees(report.verdicts):
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
