"""Correction workflow (IHE AIR's accept / reject): a person accepts a job's result, or rejects
it with a reason, and the node withdraws what it already sent.

A rejection, in one transaction (:mod:`pacs_node.catalog.reviews`): the job is marked
``rejected`` (the node's archive hides it), its deliveries not yet sent are stopped, and a job
event keeps who, when, why, the title and the model version. Then, for what already went out:

- every DICOM destination that received (or is receiving) an object of the job gets an IHE IOCM
  rejection note, a Key Object Selection Document titled 113001 or 113037 (DCM) that references
  every DICOM object of the job (:mod:`pacs_node.results.rejection`);
- every FHIR destination that received the job's Bundle gets a transaction setting its
  DiagnosticReport and Observations ``entered-in-error``
  (:func:`pacs_node.results.fhir.withdrawal_bundle`) -- unless a newer job of the same study,
  model and series has since been delivered (or is being sent) to that EHR: its report (one per
  model and series, updated by each run) then holds that newer result, which this rejection
  does not touch.

Both are stored as ``rejection`` results of the job and sent by the outbox like any result.
A job none of whose objects went out is only marked and stopped. A stored result that cannot be
read never blocks a rejection: what would need it is left unwithdrawn, logged and reported. The
quality gate's reject of a held result is this same path (nothing of it went out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from pacs_node.actor import Actor
from pacs_node.catalog import quality, reviews
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import Result
from pacs_node.catalog.results import FHIR_MEDIA_TYPE, StoredEncoding, write_files
from pacs_node.catalog.reviews import ReviewCount, ReviewRefused, UnknownJob
from pacs_node.config import Settings
from pacs_node.errors import ResultsError
from pacs_node.outputs import OutputKind
from pacs_node.review import RejectionKind
from pacs_node.services.audit import audit_operation

log = logging.getLogger(__name__)

__all__ = [
    "Acceptance",
    "Rejection",
    "RejectionKind",
    "ReviewCount",
    "ReviewRefused",
    "UnknownJob",
    "accept_results",
    "reject_results",
    "review_counts",
]


@dataclass(frozen=True)
class Rejection:
    """What a rejection did."""

    job_id: int
    kind: RejectionKind
    stopped: int  # deliveries that will never be sent
    note_uid: str | None = None  # the rejection note's SOP Instance UID, when one was built
    dicom_destinations: tuple[str, ...] = ()  # where the rejection note goes
    fhir_destinations: tuple[str, ...] = ()  # where the entered-in-error Bundle goes
    fhir_kept: tuple[str, ...] = field(default=())  # FHIR destinations a newer result reached
    # destinations that got the result but no withdrawal: a stored object cannot be read
    not_withdrawn: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": str(self.kind),
            "code": self.kind.code,
            "meaning": self.kind.meaning,
            "stopped": self.stopped,
            "note_uid": self.note_uid,
            "dicom_destinations": list(self.dicom_destinations),
            "fhir_destinations": list(self.fhir_destinations),
            "fhir_kept": list(self.fhir_kept),
            "not_withdrawn": list(self.not_withdrawn),
        }


@dataclass(frozen=True)
class Acceptance:
    job_id: int
    released: int  # deliveries the quality gate held, sent now

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "released": self.released}


def _results_dir(settings: Settings) -> Path:
    return settings.node.data_dir / "results"


def _header(results_dir: Path, encodings: dict[str, str]) -> Dataset:
    path = results_dir / next(iter(encodings.values()))
    try:
        return dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, EOFError, ValueError) as exc:
        raise ResultsError(f"a stored result cannot be read ({path.name}): {exc}") from exc


def _stored_bytes(results_dir: Path, encodings: dict[str, str]) -> bytes:
    path = results_dir / next(iter(encodings.values()))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ResultsError(f"a stored result cannot be read ({path.name}): {exc}") from exc


def _model_version(headers: list[Dataset]) -> str | None:
    """The model's version as the objects name it: the Contributing Equipment item that
    carries the model's Device UID (see :mod:`pacs_node.results.provenance`)."""
    for ds in headers:
        for item in ds.get("ContributingEquipmentSequence", []):
            if "DeviceUID" in item and item.get("SoftwareVersions"):
                return str(item.SoftwareVersions)
    return None


def _readable_headers(
    results_dir: Path, results: Sequence[Result], job_id: int
) -> tuple[list[Dataset], bool]:
    """The headers of the job's stored DICOM results, and whether every one could be read. One
    that cannot is left out and logged (its ids only): a rejection must not fail for it."""
    headers: list[Dataset] = []
    complete = True
    for result in results:
        try:
            headers.append(_header(results_dir, result.encodings))
        except ResultsError as exc:
            complete = False
            log.warning(
                "a stored result cannot be read",
                extra={
                    "job_id": job_id,
                    "result_id": result.id,
                    "error": type(exc.__cause__ or exc).__name__,
                },
            )
    return headers, complete


def _withdrawal(results_dir: Path, bundle: reviews.SentResult, kind: RejectionKind) -> bytes:
    """The entered-in-error transaction for a Bundle that went out; ResultsError when the stored
    Bundle cannot be read or is not one."""
    from pacs_node.results.fhir import bundle_json, withdrawal_bundle

    sent_bytes = _stored_bytes(results_dir, bundle.encodings)
    try:
        return bundle_json(withdrawal_bundle(sent_bytes, kind.meaning))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"a stored FHIR Bundle is not one: {type(exc).__name__}") from exc


def reject_results(
    catalog: Catalog,
    settings: Settings,
    job_id: int,
    actor: Actor,
    reason_text: str,
    kind: RejectionKind | str = RejectionKind.QUALITY,
) -> Rejection:
    """Reject job ``job_id``'s result for ``kind`` (quality, or patient safety for a result
    filed under the wrong patient) and withdraw what went out (module docstring).
    ReviewRefused when the job is unknown, not done or rejected already.

    A stored result that cannot be read never blocks the rejection: the job is still marked
    and its deliveries stopped; a destination that would need a withdrawal built from it is
    listed in ``not_withdrawn`` (logged at ERROR, and a job event)."""
    from pacs_node.results.build import stored
    from pacs_node.results.rejection import build_rejection_note

    kind = RejectionKind(kind)
    results_dir = _results_dir(settings)
    with catalog.sessions.begin() as session:
        job = reviews.reviewed_job(session, job_id)
        sent = reviews.sent_results(session, job_id)  # a rejection stops only what is not
        dicom_names = tuple(dict.fromkeys(s.destination for s in sent if s.sop_class_uid))
        headers: list[Dataset] = []
        complete = True
        if dicom_names or job.model_version is None:  # the objects are read only when needed
            own = [r for r in reviews.job_results(session, job_id) if r.sop_class_uid]
            headers, complete = _readable_headers(results_dir, own, job_id)
        version = job.model_version or _model_version(headers)
        fhir_sent = [s for s in sent if s.kind == OutputKind.FHIR]
        # an EHR whose one report a newer result of the same series holds keeps it
        reached = quality.newer_reports(session, job_id) if fhir_sent else set()
        kept = tuple(dict.fromkeys(s.destination for s in fhir_sent if s.destination in reached))
        stopped = reviews.reject_job(session, job, actor, reason_text, kind, version, kept)
        items: list[tuple[StoredEncoding, tuple[str, ...]]] = []
        not_withdrawn: list[str] = []
        note_uid = None
        if dicom_names and complete and headers:
            note = stored(
                OutputKind.REJECTION, build_rejection_note(headers, kind, datetime.now(UTC))
            )
            note_uid = note.sop_instance_uid
            encoding = StoredEncoding(
                kind=str(OutputKind.REJECTION),
                sop_class_uid=note.sop_class_uid,
                sop_instance_uid=note.sop_instance_uid,
                series_uid=note.series_instance_uid,
                encoding=note.transfer_syntax_uid,
                data=note.data,
            )
            items.append((encoding, dicom_names))
        elif dicom_names:
            not_withdrawn.extend(dicom_names)
            log.error(
                "no rejection note could be built (a stored result cannot be read): the "
                "rejected objects stay at the destinations",
                extra={"job_id": job_id, "destinations": list(dicom_names)},
            )
        fhir_names: list[str] = []
        # each Bundle that went out (one per series of the job) to each EHR
        for bundle in {(s.result_id, s.destination): s for s in fhir_sent}.values():
            if bundle.destination in reached:
                continue
            try:
                data = _withdrawal(results_dir, bundle, kind)
            except ResultsError as exc:
                if bundle.destination not in not_withdrawn:
                    not_withdrawn.append(bundle.destination)
                log.error(
                    "no withdrawal could be built (the stored Bundle cannot be read): the "
                    "rejected report stays at the destination",
                    extra={
                        "job_id": job_id,
                        "destination": bundle.destination,
                        "error": type(exc.__cause__ or exc).__name__,
                    },
                )
                continue
            withdrawal = StoredEncoding(
                kind=str(OutputKind.REJECTION),
                sop_class_uid=None,
                sop_instance_uid=None,
                series_uid=None,
                encoding=FHIR_MEDIA_TYPE,
                data=data,
                patient_search=bundle.patient_search,
                destination=bundle.destination,
            )
            items.append((withdrawal, (bundle.destination,)))
            if bundle.destination not in fhir_names:
                fhir_names.append(bundle.destination)
        if not_withdrawn:
            reviews.note_not_withdrawn(session, job_id, not_withdrawn)
        if items:
            relpaths = write_files(
                results_dir,
                f"{job_id}/{OutputKind.REJECTION}",
                [item for item, _ in items],
                fsync=settings.node.fsync,
            )
            reviews.queue_withdrawals(session, job_id, items, relpaths)
    log.info(
        "result rejected",
        extra={
            "job_id": job_id,
            "study_uid": job.study_uid,
            "rejection": str(kind),
            "stopped": stopped,
            "note_uid": note_uid,
            "withdrawn_from": [*dicom_names, *fhir_names] if note_uid else fhir_names,
        },
    )
    audit_operation(catalog, actor, "reject", job_id=job_id, detail=f"rejected ({kind})")
    return Rejection(
        job_id=job_id,
        kind=kind,
        stopped=stopped,
        note_uid=note_uid,
        dicom_destinations=dicom_names if note_uid else (),
        fhir_destinations=tuple(fhir_names),
        fhir_kept=kept,
        not_withdrawn=tuple(not_withdrawn),
    )


def accept_results(catalog: Catalog, job_id: int, actor: Actor) -> Acceptance:
    """Record that ``actor`` judged job ``job_id``'s result right; a result the quality gate
    holds is released by it (sent now). ReviewRefused when the job is unknown, not done or
    rejected; StaleRelease when a held result is older than one already sent."""
    with catalog.sessions.begin() as session:
        job = reviews.reviewed_job(session, job_id)
        reviews.accept_job(session, job, actor)  # refuses a rejected result
        released = quality.release_result(session, job_id, actor)  # a stale one: all undone
    audit_operation(catalog, actor, "release", job_id=job_id, detail="result accepted")
    return Acceptance(job_id=job_id, released=released)


def review_counts(catalog: Catalog) -> list[ReviewCount]:
    """Per model and version: how many results people accepted and rejected (each job's
    latest review)."""
    with catalog.sessions() as session:
        return reviews.review_counts(session)
