"""Modality Performed Procedure Step rows: created IN PROGRESS, set once to COMPLETED or
DISCONTINUED, with the instances the step lists (PS3.4 F.7, PS3.3 C.4.14).

Every transition is one compare-and-set UPDATE, so two ingest nodes (or two SCP worker
processes) answering N-SETs for the same step agree on which one ended it. Assembly reads
:func:`step_progress` to mark a study stable as soon as its steps are done.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session

from pacs_node.catalog.models import (
    Instance,
    PerformedInstance,
    PerformedStep,
    PerformedStepStatus,
    Series,
    Study,
)

_IN_CHUNK = 500  # study UIDs per IN (...) list


@dataclass(frozen=True, slots=True)
class ListedInstance:
    """One entry of a Performed Series Sequence: an instance the step says it produced."""

    series_uid: str
    sop_instance_uid: str


class SetOutcome(enum.StrEnum):
    UPDATED = "updated"
    UNKNOWN = "unknown"  # no such step: 0x0112
    ENDED = "ended"  # COMPLETED or DISCONTINUED already: 0x0110
    FOREIGN = "foreign"  # another AE created it: 0x0124


class CreateOutcome(enum.StrEnum):
    CREATED = "created"
    DUPLICATE = "duplicate"  # the SOP Instance UID is taken: 0x0111
    TOO_MANY_OPEN = "too-many-open"  # the AE has its cap of steps IN PROGRESS: 0x0213


@dataclass(frozen=True, slots=True)
class StepUpdate:
    outcome: SetOutcome
    study_uid: str | None = None
    status: PerformedStepStatus | None = None  # the step's status after the call


@dataclass(frozen=True, slots=True)
class StepProgress:
    """What the steps of one study say; ``ready``: the scanner is done and every instance
    it listed is in the catalog."""

    in_progress: int
    completed: int
    discontinued: int
    # Instances listed by COMPLETED steps that are not (yet) in the study: at least this many
    # (0 when a step in progress, unlisted or spent already says the study is not ready).
    missing: int
    unlisted: int = 0  # COMPLETED steps that list no instance: they prove nothing
    # The study was stable since the last step ended: instances that came after it (the study
    # reopened) are not the steps' doing, and the quiet period decides for them.
    spent: bool = False

    @property
    def ready(self) -> bool:
        return (
            self.completed > 0
            and self.in_progress == 0
            and self.missing == 0
            and not self.unlisted
            and not self.spent
        )


def step_exists(session: Session, sop_instance_uid: str) -> bool:
    found = session.scalar(
        select(PerformedStep.id).where(PerformedStep.sop_instance_uid == sop_instance_uid)
    )
    return found is not None


def open_steps(session: Session, calling_ae: str) -> int:
    """How many steps ``calling_ae`` has IN PROGRESS."""
    count = session.scalar(
        select(func.count(PerformedStep.id)).where(
            PerformedStep.calling_ae == calling_ae,
            PerformedStep.status == PerformedStepStatus.IN_PROGRESS,
        )
    )
    return int(count or 0)


def create_step(
    session: Session,
    sop_instance_uid: str,
    study_uid: str,
    calling_ae: str,
    now: datetime,
    listed: Sequence[ListedInstance] | None = None,
    max_open: int | None = None,
) -> CreateOutcome:
    """Record a new step IN PROGRESS, with the instances its Performed Series Sequence lists
    (a later N-SET's list replaces them). Refused when the SOP Instance UID is taken (a race
    with another process ends in the unique constraint: IntegrityError at commit) or when
    ``calling_ae`` already has ``max_open`` steps IN PROGRESS: a scanner that never ends its
    steps must not grow the table without bound."""
    if step_exists(session, sop_instance_uid):
        return CreateOutcome.DUPLICATE
    if max_open is not None and open_steps(session, calling_ae) >= max_open:
        return CreateOutcome.TOO_MANY_OPEN
    step = PerformedStep(
        sop_instance_uid=sop_instance_uid,
        study_uid=study_uid,
        calling_ae=calling_ae,
        status=PerformedStepStatus.IN_PROGRESS,
        listed=0,
        created_at=now,
        updated_at=now,
    )
    session.add(step)
    session.flush()
    if listed:
        step.listed = _list_instances(session, step.id, listed)
        session.flush()
    return CreateOutcome.CREATED


def _list_instances(session: Session, step_id: int, listed: Sequence[ListedInstance]) -> int:
    """Replace the instances ``step_id`` lists; how many distinct ones it lists now."""
    session.execute(delete(PerformedInstance).where(PerformedInstance.step_id == step_id))
    unique = {item.sop_instance_uid: item for item in listed}
    if unique:
        session.execute(
            insert(PerformedInstance),
            [
                {
                    "step_id": step_id,
                    "series_uid": item.series_uid,
                    "sop_instance_uid": item.sop_instance_uid,
                }
                for item in unique.values()
            ],
        )
    return len(unique)


def set_step(
    session: Session,
    sop_instance_uid: str,
    status: PerformedStepStatus | None,
    listed: Sequence[ListedInstance] | None,
    now: datetime,
    calling_ae: str,
) -> StepUpdate:
    """Apply an N-SET of ``calling_ae`` to a step it created, still IN PROGRESS: the new
    status (None: unchanged) and the Performed Series Sequence (None: not in the modification
    list; else it replaces the listed instances, as an N-SET replaces a value). Only the AE
    that created a step may change it (PS3.4 F.7.2.2: the N-SET comes from the step's
    performer), so the AE is part of the compare-and-set. The UPDATE comes first, so it takes
    the write lock (SQLite) or the row lock (PostgreSQL) before anything is read."""
    values: dict[str, object] = {"updated_at": now}
    if status is not None:
        values["status"] = status
        if status is not PerformedStepStatus.IN_PROGRESS:
            values["ended_at"] = now
    result = session.execute(
        update(PerformedStep)
        .where(
            PerformedStep.sop_instance_uid == sop_instance_uid,
            PerformedStep.calling_ae == calling_ae,
            PerformedStep.status == PerformedStepStatus.IN_PROGRESS,
        )
        .values(**values)
    )
    row = session.execute(
        select(
            PerformedStep.id,
            PerformedStep.study_uid,
            PerformedStep.status,
            PerformedStep.calling_ae,
        ).where(PerformedStep.sop_instance_uid == sop_instance_uid)
    ).first()
    if row is None:
        return StepUpdate(SetOutcome.UNKNOWN)
    step_id, study_uid, current, owner = row
    if owner != calling_ae:  # neither its status nor its study is told to a stranger
        return StepUpdate(SetOutcome.FOREIGN)
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return StepUpdate(SetOutcome.ENDED, study_uid, current)
    if listed is not None:
        count = _list_instances(session, step_id, listed)
        session.execute(
            update(PerformedStep).where(PerformedStep.id == step_id).values(listed=count)
        )
    return StepUpdate(SetOutcome.UPDATED, study_uid, current)


def step_progress(session: Session, study_uid: str) -> StepProgress | None:
    """The steps of ``study_uid`` (None when it has none). Counts come first; the join of the
    listed instances with the study's runs only when they cannot already tell the study is not
    ready (a step in progress or unlisted, or fewer instances received than one step lists):
    it is called after every batch of instances of a study with a completed step."""
    counts = dict(
        session.execute(
            select(PerformedStep.status, func.count(PerformedStep.id))
            .where(PerformedStep.study_uid == study_uid)
            .group_by(PerformedStep.status)
        ).all()
    )
    if not counts:
        return None
    in_progress = int(counts.get(PerformedStepStatus.IN_PROGRESS, 0))
    completed = int(counts.get(PerformedStepStatus.COMPLETED, 0))
    unlisted, most_listed, last_ended = session.execute(
        select(
            func.count(PerformedStep.id).filter(PerformedStep.listed == 0),
            func.max(PerformedStep.listed),
            func.max(PerformedStep.ended_at),
        ).where(
            PerformedStep.study_uid == study_uid,
            PerformedStep.status == PerformedStepStatus.COMPLETED,
        )
    ).one()
    study = session.execute(
        select(Study.id, Study.stable_at).where(Study.study_uid == study_uid)
    ).first()
    spent = last_ended is not None and study is not None and study.stable_at is not None
    spent = spent and study.stable_at >= last_ended  # type: ignore[union-attr]
    # Not counted when something else already says the study is not ready; every listed
    # instance is missing from a study not received yet.
    missing = int(most_listed or 0) if study is None else 0
    if study is not None and completed and not (in_progress or unlisted or spent):
        received = session.scalar(
            select(func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id)
        )
        # Each step lists distinct instances, all of this study: fewer received than one step
        # lists means some are missing, by at least the difference, without the join.
        missing = max(0, int(most_listed or 0) - int(received or 0))
        if not missing:
            missing = _missing(session, study_uid, study.id)
    return StepProgress(
        spent=spent,
        unlisted=int(unlisted or 0),
        in_progress=in_progress,
        completed=completed,
        discontinued=int(counts.get(PerformedStepStatus.DISCONTINUED, 0)),
        missing=missing,
    )


def _missing(session: Session, study_uid: str, study_id: int) -> int:
    """Instances listed by the study's COMPLETED steps that are not in the study."""
    received = exists().where(
        Instance.sop_instance_uid == PerformedInstance.sop_instance_uid,
        Instance.series_id == Series.id,
        Series.study_id == study_id,
    )
    missing = session.scalar(
        select(func.count(PerformedInstance.id))
        .join(PerformedStep, PerformedStep.id == PerformedInstance.step_id)
        .where(
            PerformedStep.study_uid == study_uid,
            PerformedStep.status == PerformedStepStatus.COMPLETED,
            ~received,
        )
    )
    return int(missing or 0)


def studies_with_completed_steps(session: Session, study_uids: Iterable[str]) -> set[str]:
    """Those of ``study_uids`` with at least one COMPLETED step: the ones worth an
    immediate stability check when instances arrive."""
    wanted = sorted(set(study_uids))
    found: set[str] = set()
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        found.update(
            session.scalars(
                select(PerformedStep.study_uid)
                .where(
                    PerformedStep.study_uid.in_(chunk),
                    PerformedStep.status == PerformedStepStatus.COMPLETED,
                )
                .distinct()
            )
        )
    return found


def expire_steps(session: Session, absent_before: datetime, open_before: datetime) -> int:
    """Remove the steps nothing will use: those whose study is not in the catalog and that
    have not changed since ``absent_before`` (its images never came, or went elsewhere), and
    those still IN PROGRESS since before ``open_before`` (a scanner that never ended them).
    Their listed instances go by cascade. How many steps went."""
    study_absent = ~exists().where(Study.study_uid == PerformedStep.study_uid)
    result = session.execute(
        delete(PerformedStep).where(
            or_(
                and_(study_absent, PerformedStep.updated_at < absent_before),
                and_(
                    PerformedStep.status == PerformedStepStatus.IN_PROGRESS,
                    PerformedStep.created_at < open_before,
                ),
            )
        )
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def forget_steps(session: Session, study_uid: str) -> None:
    """The steps of a study that is purged go with it."""
    session.execute(delete(PerformedStep).where(PerformedStep.study_uid == study_uid))


def steps_of(session: Session, study_uid: str) -> list[PerformedStep]:
    """The steps of one study, oldest first (for listings and tests)."""
    return list(
        session.scalars(
            select(PerformedStep)
            .where(PerformedStep.study_uid == study_uid)
            .order_by(PerformedStep.id)
        )
    )
