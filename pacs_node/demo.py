"""The demo study and its way through a running node, as read from the catalog.

:func:`make_study` renders a small procedural phantom CT (``models/phantom``) as a DICOM series;
:func:`observe` reads, without changing anything, how far the node has taken that study:
received, stable, routed, each job and each delivery. :class:`Progress` names the phase and
says whether the demo is over and why. The CLI (``pacs-node demo``) sends the study with the
Storage SCU and polls :func:`observe` until :attr:`Progress.finished`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.orm import Session

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import DeliverySummary, list_deliveries
from pacs_node.catalog.jobs import JobSummary, list_jobs
from pacs_node.catalog.models import DeliveryState, JobState, RouteOutcome
from pacs_node.catalog.studies import list_studies

# Small enough to render, send and segment in seconds on two cores; axial, 4 mm, 30 slices,
# which the shipped ct-body rule routes to ct-torso-organs.
DEMO_THICKNESS_MM = 4.0
DEMO_PIXEL_MM = 1.8
DEMO_COVERAGE_MM = 120.0

_JOB_OVER = frozenset({JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value})
_SETTLED = frozenset(
    {DeliveryState.DELIVERED.value, DeliveryState.HELD.value, DeliveryState.DEAD.value}
)
_NOT_ROUTED = {
    RouteOutcome.UNROUTED.value: "no routing rule matched it",
    RouteOutcome.IGNORED.value: "the matching rules leave a changed study alone",
    RouteOutcome.OWN_OUTPUT.value: "it holds only objects this node produced",
}


def make_study(folder: Path, seed: int) -> tuple[str, list[Path]]:
    """Write a phantom CT series into ``folder``; (Study Instance UID, files). UIDs follow from
    ``seed``: the same seed gives the same study again."""
    from phantom.render import TRAINING, render_ct
    from phantom.writers import write_dicom
    from pydicom import dcmread

    ranges = replace(
        TRAINING,
        thickness_mm=(DEMO_THICKNESS_MM, DEMO_THICKNESS_MM),
        pixel_mm=(DEMO_PIXEL_MM, DEMO_PIXEL_MM),
        coverage_mm=(DEMO_COVERAGE_MM, DEMO_COVERAGE_MM),
        fov_scale=(1.1, 1.2),
        noise=(10.0, 15.0),
        metal=False,
    )
    paths = write_dicom(render_ct(seed, ranges), folder)
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return study_uid, paths


@dataclass(frozen=True)
class Progress:
    """How far the node has taken one study (a snapshot of the catalog)."""

    study_uid: str
    expected: int  # instances sent
    received: int = 0
    state: str | None = None  # receiving | stable
    route_outcome: str | None = None
    jobs: tuple[JobSummary, ...] = ()
    deliveries: tuple[DeliverySummary, ...] = ()

    @property
    def not_routed(self) -> str | None:
        """Why the study will not be processed, once routing has said so."""
        if self.jobs or self.state != "stable":
            return None
        return _NOT_ROUTED.get(self.route_outcome or "")

    @property
    def jobs_over(self) -> bool:
        return bool(self.jobs) and all(j.state in _JOB_OVER for j in self.jobs)

    @property
    def deliveries_settled(self) -> bool:
        """Every delivery has had its first answer: delivered, held, dead, or waiting for a
        retry after an attempt (a destination that is down does not keep the demo waiting)."""
        return all(
            d.state in _SETTLED or (d.state == DeliveryState.PENDING.value and d.attempts > 0)
            for d in self.deliveries
        )

    @property
    def finished(self) -> bool:
        return self.not_routed is not None or (self.jobs_over and self.deliveries_settled)

    @property
    def phase(self) -> str:
        """One line for the progress display."""
        if self.state is None:
            return "waiting for the node to record the study"
        if self.state == "receiving":
            return f"receiving ({self.received}/{self.expected} instances recorded)"
        if self.not_routed is not None:
            return f"not routed: {self.not_routed}"
        if not self.jobs:
            return "stable; routing"
        if not self.jobs_over:
            running = [j for j in self.jobs if j.state not in _JOB_OVER]
            job = running[0]
            if job.state == JobState.QUEUED.value:
                return f"job {job.id} ({job.model}) queued"
            return f"job {job.id} ({job.model}): {job.stage or 'starting'} {job.progress:.0%}"
        done = sum(d.state in _SETTLED for d in self.deliveries)
        return f"delivering ({done}/{len(self.deliveries)} settled)"

    @property
    def job_progress(self) -> float:
        """0..1 over the study's jobs."""
        if not self.jobs:
            return 0.0
        return sum(1.0 if j.state in _JOB_OVER else j.progress for j in self.jobs) / len(self.jobs)


def follow(catalog: Catalog, study_uid: str, expected: int) -> Progress:
    """:func:`observe` in a session of its own (one poll of a door that follows the study)."""
    with catalog.sessions() as session:
        return observe(session, study_uid, expected)


def observe(session: Session, study_uid: str, expected: int) -> Progress:
    """Read the study's state, jobs and deliveries from the catalog (nothing is written)."""
    found = list_studies(session, [study_uid])
    if not found:
        return Progress(study_uid=study_uid, expected=expected)
    study = found[0]
    jobs = tuple(j for j in list_jobs(session) if j.study_uid == study_uid)
    deliveries: tuple[DeliverySummary, ...] = ()
    for job in jobs:
        deliveries += tuple(list_deliveries(session, job_id=job.id))
    return Progress(
        study_uid=study_uid,
        expected=expected,
        received=study.instances,
        state=study.state,
        route_outcome=study.route_outcome,
        jobs=jobs,
        deliveries=deliveries,
    )
