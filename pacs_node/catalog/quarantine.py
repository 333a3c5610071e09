"""Quarantine rows and the lookups the identity check reads: which study holds a Study, Series
or SOP Instance UID, under which patient; listings for ``pacs-node quarantine`` and ``studies``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Connection,
    String,
    bindparam,
    cast,
    func,
    literal,
    null,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from pacs_node.catalog.models import (
    Instance,
    Purge,
    QuarantineItem,
    QuarantineState,
    Series,
    Study,
)


def patient_key(patient_id: str | None, issuer_of_patient_id: str | None) -> str:
    """Patient ID qualified by its Issuer, normalised: surrounding spaces and NUL padding go,
    an absent value is empty, case is kept (PS3.5 LO is case sensitive)."""
    pid = (patient_id or "").strip(" \0")
    issuer = (issuer_of_patient_id or "").strip(" \0")
    return f"{issuer}\\{pid}"


@dataclass(slots=True)
class HeldUIDs:
    """What the catalog holds for a set of UIDs; the identity check reads it per instance."""

    # Study UID -> (row id, patient key)
    studies: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)  # Series UID -> Study UID
    # SOP Instance UID -> (path, Study UID, Series UID, sha256)
    sops: dict[str, tuple[str, str, str, str | None]] = field(default_factory=dict)


def lookup_held(
    session: Session,
    study_uids: Iterable[str],
    series_uids: Iterable[str],
    sop_uids: Iterable[str],
) -> HeldUIDs:
    held = HeldUIDs()
    for sid, uid, pid, issuer in session.execute(
        select(Study.id, Study.study_uid, Study.patient_id, Study.issuer_of_patient_id).where(
            Study.study_uid.in_(set(study_uids))
        )
    ).all():
        held.studies[uid] = (sid, patient_key(pid, issuer))
    for series_uid, study_uid in session.execute(
        select(Series.series_uid, Study.study_uid)
        .join(Study, Study.id == Series.study_id)
        .where(Series.series_uid.in_(set(series_uids)))
    ).all():
        held.series[series_uid] = study_uid
    for sop, path, series_uid, study_uid, sha in session.execute(
        select(
            Instance.sop_instance_uid,
            Instance.path,
            Series.series_uid,
            Study.study_uid,
            Instance.sha256,
        )
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Instance.sop_instance_uid.in_(set(sop_uids)))
    ).all():
        held.sops[sop] = (path, study_uid, series_uid, sha)
    return held


# The per-C-STORE screen's three indexed lookups in one statement (one round trip, compiled
# once): rows of (which, a, b, c, d), which 1: the study's patient, 2: the series' study,
# 3: the SOP Instance's path, study, series and digest.
_TEXT_NULL = cast(null(), String)
_HELD_OF_UIDS: CompoundSelect[Any] = union_all(
    select(
        literal(1).label("which"),
        Study.patient_id.label("a"),
        Study.issuer_of_patient_id.label("b"),
        _TEXT_NULL.label("c"),
        _TEXT_NULL.label("d"),
    ).where(Study.study_uid == bindparam("study")),
    select(literal(2), Study.study_uid, _TEXT_NULL, _TEXT_NULL, _TEXT_NULL)
    .join(Series, Series.study_id == Study.id)
    .where(Series.series_uid == bindparam("series")),
    select(literal(3), Instance.path, Study.study_uid, Series.series_uid, Instance.sha256)
    .join(Series, Series.id == Instance.series_id)
    .join(Study, Study.id == Series.study_id)
    .where(Instance.sop_instance_uid == bindparam("sop")),
)


def lookup_one(connection: Connection, study_uid: str, series_uid: str, sop_uid: str) -> HeldUIDs:
    """:func:`lookup_held` for one instance, on a plain connection: the per-C-STORE screen
    (three indexed lookups in one statement, compiled once)."""
    held = HeldUIDs()
    rows = connection.execute(
        _HELD_OF_UIDS, {"study": study_uid, "series": series_uid, "sop": sop_uid}
    ).all()
    for which, a, b, c, d in rows:
        if which == 1 and study_uid not in held.studies:
            held.studies[study_uid] = (None, patient_key(a, b))
        elif which == 2 and series_uid not in held.series:
            held.series[series_uid] = a
        elif which == 3 and sop_uid not in held.sops:
            held.sops[sop_uid] = (a, b, c, d)
    return held


_PENDING_PURGE = select(Purge.id).where(
    Purge.study_uid == bindparam("study"), Purge.files_removed_at.is_(None)
)


def being_removed(connection: Connection | Session, study_uid: str) -> bool:
    """Retention has removed the study's rows and not yet its files."""
    return connection.execute(_PENDING_PURGE, {"study": study_uid}).first() is not None


def held_counts(session: Session, study_uids: Iterable[str]) -> dict[str, int]:
    """Per study: how many instances that collided with it wait in quarantine."""
    return {
        str(uid): int(n)
        for uid, n in session.execute(
            select(QuarantineItem.collided_study_uid, func.count(QuarantineItem.id))
            .where(
                QuarantineItem.collided_study_uid.in_(list(study_uids)),
                QuarantineItem.state == QuarantineState.HELD,
            )
            .group_by(QuarantineItem.collided_study_uid)
        ).all()
    }


def item_json(item: QuarantineItem) -> dict[str, Any]:
    """The public shape of ``quarantine --json``; fields are only ever added. The patient key
    is left out (it is patient data): ``studies`` shows the study's patient."""

    def _at(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": item.id,
        "state": item.state.value,
        "reason": item.reason,
        "reason_text": item.reason_text,
        "study_uid": item.study_uid,
        "series_uid": item.series_uid,
        "sop_instance_uid": item.sop_instance_uid,
        "sop_class_uid": item.sop_class_uid,
        "collided_study_uid": item.collided_study_uid,
        "path": item.path,
        "size_bytes": item.size_bytes,
        "sha256": item.sha256,
        "calling_ae": item.calling_ae,
        "received_at": item.received_at.isoformat(),
        "resolved_at": _at(item.resolved_at),
        "resolved_by": item.resolved_by,
        "resolved_study_uid": item.resolved_study_uid,
        "resolved_sop_instance_uid": item.resolved_sop_instance_uid,
    }


def list_items(session: Session, *, include_resolved: bool = True) -> list[QuarantineItem]:
    query = select(QuarantineItem).order_by(QuarantineItem.id)
    if not include_resolved:
        query = query.where(QuarantineItem.state == QuarantineState.HELD)
    return list(session.scalars(query))
