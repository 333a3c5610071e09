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

from sqlalchemy import delete, exists, func, insert, select, update
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
    missing: int  # instances listed by COMPLETED steps that are not (yet) in the study
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


def create_step(
    session: Session, sop_instance_uid: str, study_uid: str, calling_ae: str, now: datetime
) -> bool:
    """Record a new step IN PROGRESS; False when the SOP Instance UID is taken. A race with
    another process ends in the unique constraint (IntegrityError at commit)."""
    if step_exists(session, sop_instance_uid):
        return False
    session.add(
        PerformedStep(
            sop_instance_uid=sop_instance_uid,
            study_uid=study_uid,
            calling_ae=calling_ae,
            status=PerformedStepStatus.IN_PROGRESS,
            created_at=now,
            updated_at=now,
        )
    )
    session.flush()
    return True


def set_step(
    session: Session,
    sop_instance_uid: str,
    status: PerformedStepStatus | None,
    listed: Sequence[ListedInstance] | None,
    now: datetime,
) -> StepUpdate:
    """Apply an N-SET to a step still IN PROGRESS: the new status (None: unchanged) and the
    Performed Series Sequence (None: not in the modification list; else it replaces the
    listed instances, as an N-SET replaces a value). The UPDATE comes first, so it takes the
    write lock (SQLite) or the row lock (PostgreSQL) before anything is read."""
    values: dict[str, object] = {"updated_at": now}
    if status is not None:
        values["status"] = status
        if status is not PerformedStepStatus.IN_PROGRESS:
            values["ended_at"] = now
    result = session.execute(
        update(PerformedStep)
        .where(
            PerformedStep.sop_instance_uid == sop_instance_uid,
            PerformedStep.status == PerformedStepStatus.IN_PROGRESS,
        )
        .values(**values)
    )
    row = session.execute(
        select(PerformedStep.id, PerformedStep.study_uid, PerformedStep.status).where(
            PerformedStep.sop_instance_uid == sop_instance_uid
        )
    ).first()
    if row is None:
        return StepUpdate(SetOutcome.UNKNOWN)
    step_id, study_uid, current = row
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return StepUpdate(SetOutcome.ENDED, study_uid, current)
    if listed is not None:
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
    return StepUpdate(SetOutcome.UPDATED, study_uid, current)


def step_progress(session: Session, study_uid: str) -> StepProgress | None:
    """The steps of ``study_uid`` (None when it has none)."""
    counts = dict(
        session.execute(
            select(PerformedStep.status, func.count(PerformedStep.id))
            .where(PerformedStep.study_uid == study_uid)
            .group_by(PerformedStep.status)
        ).all()
    )
    if not counts:
        return None
    received = exists().where(
        Instance.sop_instance_uid == PerformedInstance.sop_instance_uid,
        Instance.series_id == Series.id,
        Series.study_id == Study.id,
        Study.study_uid == study_uid,
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
    unlisted = session.scalar(
        select(func.count(PerformedStep.id)).where(
            PerformedStep.study_uid == study_uid,
            PerformedStep.status == PerformedStepStatus.COMPLETED,
            ~exists().where(PerformedInstance.step_id == PerformedStep.id),
        )
    )
    last_ended = session.scalar(
        select(func.max(PerformedStep.ended_at)).where(
            PerformedStep.study_uid == study_uid,
            PerformedStep.status == PerformedStepStatus.COMPLETED,
        )
    )
    stable_at = session.scalar(select(Study.stable_at).where(Study.study_uid == study_uid))
    return StepProgress(
        spent=last_ended is not None and stable_at is not None and stable_at >= last_ended,
        unlisted=int(unlisted or 0),
        in_progress=int(counts.get(PerformedStepStatus.IN_PROGRESS, 0)),
        completed=int(counts.get(PerformedStepStatus.COMPLETED, 0)),
        discontinued=int(counts.get(PerformedStepStatus.DISCONTINUED, 0)),
        missing=int(missing or 0),
    )


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
