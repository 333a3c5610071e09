"""How a study's routing reads: one shape for ``routes explain`` and ``routes test`` (as JSON,
as a tree at the command line, as a page), so that what a folder of files would do and what the
node did look the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
