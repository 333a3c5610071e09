"""Patient identity: an instance joins a study only if its UIDs and its patient agree with what
the catalog already holds. The policy, one rule per collision (:func:`decide`)::

    SOP Instance UID held under another study or series      -> sop_in_other_series
    Series Instance UID held under another study             -> series_in_other_study
    Study held under another patient key (Patient ID with    -> patient_mismatch
      Issuer of Patient ID, normalised by catalog.quarantine.patient_key)
    SOP Instance UID held in the same place, same data set   -> duplicate (counted, success)
    SOP Instance UID held in the same place, other bytes     -> resend (``resend_policy``)

Pure decisions over what the catalog holds, used where rows are written
(:func:`pacs_node.catalog.studies.record_instances`) and by the C-STORE screen
(:mod:`pacs_node.ingest.identity`, which also says what each collision is answered with).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pacs_node.catalog.quarantine import HeldUIDs, patient_key

if TYPE_CHECKING:
    from pacs_node.refs import InstanceHeader


class Reason(enum.StrEnum):
    """Why an instance is in quarantine (``quarantine.reason``)."""

    SOP_ELSEWHERE = "sop_in_other_series"
    SERIES_ELSEWHERE = "series_in_other_study"
    PATIENT_MISMATCH = "patient_mismatch"
    RESEND = "resend_different_bytes"
    UNRECORDABLE = "unrecordable"


REASON_TEXT: dict[str, str] = {
    Reason.SOP_ELSEWHERE: "SOP Instance UID is held under another study or series",
    Reason.SERIES_ELSEWHERE: "Series Instance UID is held under another study",
    Reason.PATIENT_MISMATCH: "Patient ID or Issuer differs from the study's",
    Reason.RESEND: "SOP Instance UID re-sent with different bytes",
    Reason.UNRECORDABLE: "the catalog could not record this instance",
}


class Verdict(enum.StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    RESEND = "resend"
    CONFLICT = "conflict"


class Action(enum.StrEnum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    REJECT = "reject"
    QUARANTINE = "quarantine"
    REPLACE = "replace"


@dataclass(frozen=True, slots=True)
class Held:
    """What the catalog holds for one instance's UIDs (None: not held)."""

    study_patient_key: str | None = None
    series_study_uid: str | None = None
    sop_study_uid: str | None = None
    sop_series_uid: str | None = None
    sop_sha256: str | None = None

    @classmethod
    def of(cls, held: HeldUIDs, study_uid: str, series_uid: str, sop_uid: str) -> Held:
        study = held.studies.get(study_uid)
        sop = held.sops.get(sop_uid)
        return cls(
            study_patient_key=study[1] if study else None,
            series_study_uid=held.series.get(series_uid),
            sop_study_uid=sop[1] if sop else None,
            sop_series_uid=sop[2] if sop else None,
            sop_sha256=sop[3] if sop else None,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: Reason | None = None
    collided_study_uid: str | None = None  # the study it would have mixed with


def decide(study_uid: str, series_uid: str, key: str, sha256: str | None, held: Held) -> Decision:
    """The identity policy (module docstring) for one instance; pure."""
    if held.sop_series_uid is not None and (
        held.sop_series_uid != series_uid or held.sop_study_uid != study_uid
    ):
        return Decision(Verdict.CONFLICT, Reason.SOP_ELSEWHERE, held.sop_study_uid)
    if held.series_study_uid is not None and held.series_study_uid != study_uid:
        return Decision(Verdict.CONFLICT, Reason.SERIES_ELSEWHERE, held.series_study_uid)
    if held.study_patient_key is not None and held.study_patient_key != key:
        return Decision(Verdict.CONFLICT, Reason.PATIENT_MISMATCH, study_uid)
    if held.sop_series_uid is not None:
        if sha256 and held.sop_sha256 and sha256 != held.sop_sha256:
            return Decision(Verdict.RESEND, Reason.RESEND, study_uid)
        return Decision(Verdict.DUPLICATE)
    return Decision(Verdict.NEW)


def act(decision: Decision, identity_conflict: str, resend_policy: str) -> Action:
    """What the configured policies make of a decision."""
    if decision.verdict == Verdict.NEW:
        return Action.ACCEPT
    if decision.verdict == Verdict.DUPLICATE:
        return Action.DUPLICATE
    if decision.verdict == Verdict.CONFLICT:
        return Action.QUARANTINE if identity_conflict == "quarantine" else Action.REJECT
    return {
        "keep_first": Action.QUARANTINE,
        "replace": Action.REPLACE,
        "reject": Action.REJECT,
    }[resend_policy]


def header_key(header: InstanceHeader) -> str:
    return patient_key(header.patient_id, header.issuer_of_patient_id)
