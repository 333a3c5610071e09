"""What an operator does with a quarantined instance: release, re-assign or discard it.

Each action is one catalog transaction, with an event on the study the instance collided with
and on the study it joins, the actor who asked, and a counter (``quarantine_<action>``).

Release files the instance into a study of its own, decided from what the catalog holds now:

- its Study Instance UID is kept when no study holds it, or the study holding it has the same
  patient key (then it is that patient's own study); otherwise a new Study UID is coerced;
- its Series Instance UID is kept unless another study holds it; its SOP Instance UID is kept
  unless the catalog holds it;
- coerced UIDs are deterministic (``2.25.`` + a UUID-5 of the original UID and its new
  parent: the study's patient key, the series' study), so every quarantined instance of one
  series lands in the same new study and series, and a second release gives the same UIDs.

Without coercion the quarantined bytes themselves move into the spool. With coercion a copy is
written with the new UIDs (and the same pixel data, transfer syntax and everything else); the
original bytes stay in the quarantine area and the row keeps the original UIDs, with the new
ones in ``resolved_study_uid`` / ``resolved_sop_instance_uid``.

Re-assign (``--study UID``) is the operator saying the instance belongs to an existing study:
the copy gets that Study UID and that study's Patient ID, Issuer and name (the operator's
decision is recorded with the actor), Series and SOP Instance UIDs coerced as for release.

Discard deletes the bytes and keeps the row as ``discarded``.

The study a release creates is catalogued as receiving; the running node's assembly picks it up
on its next sweep (:meth:`pacs_node.assembly.Assembly.sweep`), a node that is not running when
it starts.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from datetime import datetime

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from pacs_node.catalog.models import QuarantineItem, QuarantineState, Study, utcnow
from pacs_node.catalog.quarantine import lookup_held, patient_key
from pacs_node.catalog.studies import add_event, increment, record_instances
from pacs_node.errors import PacsNodeError
from pacs_node.ingest.header import read_header, read_received_file
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import Spool
from pacs_node.refs import InstanceRef

_NAMESPACE = uuid.UUID("0b6c2f4e-5d1a-4f43-9a55-6b1f3c1e7d20")


class QuarantineError(PacsNodeError):
    """The quarantine action cannot be done (unknown id, not held, unknown study)."""


def coerced_uid(original: str, parent: str) -> str:
    """A new UID, deterministic from the original UID and its new parent."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{original}|{parent}').int}"


@dataclass(frozen=True)
class Filed:
    item_id: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    coerced: bool


def _held_item(session: Session, item_id: int) -> QuarantineItem:
    item = session.get(QuarantineItem, item_id)
    if item is None:
        raise QuarantineError(f"no quarantined instance with id {item_id}")
    if item.state != QuarantineState.HELD:
        raise QuarantineError(f"quarantined instance {item_id} is {item.state.value} already")
    return item


def _targets(session: Session, item: QuarantineItem, study_uid: str) -> tuple[str, str, str]:
    """(study, series, SOP Instance UID) the instance is filed under."""
    held = lookup_held(session, [study_uid], [item.series_uid], [item.sop_instance_uid])
    series_uid = item.series_uid
    owner = held.series.get(series_uid)
    if owner is not None and owner != study_uid:
        series_uid = coerced_uid(item.series_uid, study_uid)
    sop_uid = item.sop_instance_uid
    if sop_uid in held.sops:
        sop_uid = coerced_uid(item.sop_instance_uid, series_uid)
    return study_uid, series_uid, sop_uid


def _file(
    session: Session,
    spool: Spool,
    item: QuarantineItem,
    uids: tuple[str, str, str],
    patient: Study | None,
    now: datetime,
) -> bool:
    """Put the instance into the spool under ``uids`` and record it; True when a coerced copy
    was written (the original bytes stay in quarantine)."""
    study_uid, series_uid, sop_uid = uids
    source = spool.path(item.path)
    coerced = (study_uid, series_uid, sop_uid) != (
        item.study_uid,
        item.series_uid,
        item.sop_instance_uid,
    ) or patient is not None
    if coerced:
        ds = dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        if patient is not None:
            _set_patient(ds, patient)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        stored = spool.store(study_uid, series_uid, sop_uid, [buffer.getvalue()])
    else:
        with source.open("rb") as handle:
            chunks = iter(lambda: handle.read(1 << 20), b"")
            stored = spool.store(study_uid, series_uid, sop_uid, chunks)
    if stored.held is not None:  # another data set holds that name: should not happen
        spool.remove(stored.held)
        raise QuarantineError(f"the spool holds other bytes under {stored.relpath}")
    # read as the receive path reads a data set, so its facts are those a receipt records
    received = read_received_file(spool.path(stored.relpath))
    ref = InstanceRef(
        header=read_header(received),
        transfer_syntax_uid=item.transfer_syntax_uid,
        path=stored.relpath,
        size_bytes=stored.size_bytes,
        received_at=now,
        calling_ae=item.calling_ae,
        sha256=stored.sha256,
        routing=read_routing_header(received),
    )
    outcome = record_instances(session, [ref])
    if outcome.quarantined:
        raise QuarantineError("the catalog changed meanwhile; the instance would collide again")
    return coerced


def _set_patient(ds: Dataset, study: Study) -> None:
    for keyword, value in (
        ("PatientID", study.patient_id),
        ("IssuerOfPatientID", study.issuer_of_patient_id),
        ("PatientName", study.patient_name),
    ):
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _resolve(
    session: Session,
    item: QuarantineItem,
    state: QuarantineState,
    actor: str,
    now: datetime,
    filed: tuple[str, str] | None,
) -> None:
    item.state = state
    item.resolved_at = now
    item.resolved_by = actor[:64]
    if filed is not None:
        item.resolved_study_uid, item.resolved_sop_instance_uid = filed
    kind = f"quarantine_{state.value}"
    increment(session, kind)
    detail = {"quarantine_id": item.id, "actor": actor, "sop": item.sop_instance_uid}
    uids = {item.collided_study_uid, filed[0] if filed else None} - {None}
    for study in session.scalars(select(Study).where(Study.study_uid.in_(uids))):
        add_event(session, study.id, kind, now, **detail)


def release(session: Session, spool: Spool, item_id: int, actor: str) -> Filed:
    """Into a study of its own (see the module docstring)."""
    item = _held_item(session, item_id)
    now = utcnow()
    key = item.patient_key or patient_key(None, None)
    held = lookup_held(session, [item.study_uid], [], [])
    study_uid = item.study_uid
    if study_uid in held.studies and held.studies[study_uid][1] != key:
        study_uid = coerced_uid(item.study_uid, key)
    uids = _targets(session, item, study_uid)
    coerced = _file(session, spool, item, uids, None, now)
    _resolve(session, item, QuarantineState.RELEASED, actor, now, (uids[0], uids[2]))
    if not coerced:
        _remove_after_commit(session, spool, item.path)  # the same bytes are in the spool now
    return Filed(item.id, *uids, coerced=coerced)


def reassign(session: Session, spool: Spool, item_id: int, study_uid: str, actor: str) -> Filed:
    """Into an existing study an operator names; the copy takes that study's patient."""
    item = _held_item(session, item_id)
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
    if study is None:
        raise QuarantineError(f"no study {study_uid} in the catalog")
    now = utcnow()
    uids = _targets(session, item, study_uid)
    _file(session, spool, item, uids, study, now)
    _resolve(session, item, QuarantineState.REASSIGNED, actor, now, (uids[0], uids[2]))
    return Filed(item.id, *uids, coerced=True)


def discard(session: Session, spool: Spool, item_id: int, actor: str) -> None:
    """Delete the bytes; the row stays, ``discarded``, for the audit."""
    item = _held_item(session, item_id)
    _resolve(session, item, QuarantineState.DISCARDED, actor, utcnow(), None)
    _remove_after_commit(session, spool, item.path)


_REMOVALS = "pacs_node.quarantine.removals"  # session.info key: (spool, relpath) to remove


def _remove_after_commit(session: Session, spool: Spool, relpath: str) -> None:
    """Remove ``relpath`` once the transaction that resolves its row is committed: a failed
    commit leaves the row held and its bytes where it says."""
    if not event.contains(session, "after_commit", _removals_committed):
        event.listen(session, "after_commit", _removals_committed)
        event.listen(session, "after_rollback", _removals_dropped)
    session.info.setdefault(_REMOVALS, []).append((spool, relpath))


def _removals_committed(session: Session) -> None:
    for spool, relpath in session.info.pop(_REMOVALS, []):
        spool.remove(relpath)


def _removals_dropped(session: Session) -> None:
    session.info.pop(_REMOVALS, None)
