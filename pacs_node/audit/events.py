"""Audit events as values, and one constructor per thing the node audits (DICOM PS3.15 A.5.3).

An :class:`AuditEvent` holds what PS3.15 A.5 asks of a message (event identification, active
participants, participant objects) and nothing node-specific; :mod:`pacs_node.audit.message`
turns one into the ``AuditMessage`` XML. Codes are DICOM's (PS3.16, coding scheme DCM) and,
for patient numbers and URIs, RFC 3881's, as the standard names them.

=========================================  =======  ======  =========================  =======
What happened                              EventID  Action  EventTypeCode              Outcome
=========================================  =======  ======  =========================  =======
Association accepted (calling AE, address,  110113   E       110126 Node Authentication  0
TLS identity)
Association rejected, certificate refused   110113   E       110126 Node Authentication  4
Hostile PDU, limit reached                  110113   E       110132 Use of Restricted    4
                                                             Function
User or token created, changed, revoked     110113   E       110137 User Security        0
                                                             Attributes Changed
User's role changed                         110113   E       110136 Security Roles       0
                                                             Changed
Study received (once, when it is stable)    110104   C       -                          0
Result sent by C-STORE or STOW-RS           110104   R       -                          0 / 8
Result sent to FHIR (DiagnosticReport)      110106   R       -                          0 / 8
QIDO-RS and study searches                  110112   E       -                          0
Page, API or WADO read of patient data      110103   R       -                          0
Login / logout (web face)                   110114   E       110122 Login / 110123      0 / 4
                                                             Logout
Node start / stop                           110100   E       110120 / 110121            0
Reading the audit log                       110101   R       -                          0
Retention purge of a study                  110105   D       -                          0
Operator action on a study: re-run,         110103   C / U   -                          0
retry, cancel, release / D reject
=========================================  =======  ======  =========================  =======

Operator actions are DICOM Instances Accessed (110103, A.5.3.3: instances "viewed, utilized,
updated, or deleted"): a re-run creates results (C), a retry, cancel or release updates their
state (U), a rejection withdraws them (D); the operation's name travels as a
ParticipantObjectDetail ``Operation``. Accepted associations are Security Alerts with a success
outcome: A.5.3.11 makes a success an informative alert, and Node Authentication is what the
acceptance of a peer is.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # the SOP class a study search stands for


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value (CodedValueType): code, coding scheme, meaning."""

    code: str
    meaning: str
    scheme: str = "DCM"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


# EventID (PS3.16 CID 400)
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
EXPORT = Code("110106", "Export")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
# EventTypeCode (CIDs 401, 403, 404)
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
SECURITY_ROLES_CHANGED = Code("110136", "Security Roles Changed")
USER_SECURITY_CHANGED = Code("110137", "User Security Attributes Changed")
# RoleIDCode (CID 402)
APPLICATION = Code("110150", "Application")
APPLICATION_LAUNCHER = Code("110151", "Application Launcher")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
DESTINATION_MEDIA = Code("110154", "Destination Media")
# MediaType (CID 405): a FHIR server is reached by its URI, the closest media the list has
URI_MEDIA = Code("110037", "URI")
# ParticipantObjectIDTypeCode (CID 404 and RFC 3881)
STUDY_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
NODE_ID = Code("110182", "Node ID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
USER_IDENTIFIER = Code("11", "User Identifier", "RFC-3881")
URI = Code("12", "URI", "RFC-3881")


AETITLES = "AETITLES="


@dataclass(frozen=True, slots=True)
class Participant:
    """An ActiveParticipant: a user, a peer AE or the node itself."""

    user_id: str
    requestor: bool
    address: str | None = None  # NetworkAccessPointID
    role: Code | None = None
    alternative_id: str | None = None  # AETITLES=<AE> for a DICOM application (A.5.2.2)
    name: str | None = None  # UserName: e.g. the subject of a peer's TLS certificate
    media_type: Code | None = None  # MediaIdentifier/MediaType (Destination Media of Export)

    @property
    def shown(self) -> str:
        """How lists show it: a DICOM application by its AE title, anyone else by UserID."""
        if self.alternative_id and self.alternative_id.startswith(AETITLES):
            return self.alternative_id.removeprefix(AETITLES)
        return self.user_id

    @property
    def address_type(self) -> str:
        """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
        text = (self.address or "").strip("[]")
        return "2" if text and (":" in text or text.replace(".", "").isdigit()) else "1"


@dataclass(frozen=True, slots=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study, a patient, a query, a user, a log."""

    object_id: str
    id_type: Code
    type_code: str  # 1 person, 2 system object, 3 organisation, 4 other
    role: str  # ParticipantObjectTypeCodeRole
    query: bytes | None = None
    details: tuple[tuple[str, str], ...] = ()
    sop_classes: tuple[tuple[str, int], ...] = ()  # (SOP Class UID, number of instances)
    name: str | None = None  # ParticipantObjectName (the ID when None and no query)
    accession: str | None = None  # a study's, in its ParticipantObjectDescription

    def label(self) -> str:
        kind = {
            STUDY_UID.code: "study",
            PATIENT_NUMBER.code: "patient",
            SOP_CLASS_UID.code: "query",
            USER_IDENTIFIER.code: "user",
            NODE_ID.code: "node",
            URI.code: "uri",
        }.get(self.id_type.code, self.id_type.meaning)
        return f"{kind}:{self.object_id}"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One auditable event; ``at`` must carry its UTC offset."""

    event_id: Code
    action: str  # EventActionCode: C R U D E
    outcome: Outcome
    at: datetime
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    types: tuple[Code, ...] = ()
    description: str | None = None  # EventOutcomeDescription

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ValueError("an audit event's time needs its UTC offset")
        if self.action not in ("C", "R", "U", "D", "E"):
            raise ValueError(f"not an EventActionCode: {self.action!r}")
        if not self.participants:
            raise ValueError("an audit event needs at least one active participant")

    @property
    def actor(self) -> str:
        """Who asked: the requesting participant (the first one when none is marked)."""
        for participant in self.participants:
            if participant.requestor:
                return participant.shown
        return self.participants[0].shown

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id.code,
            "event": self.event_id.meaning,
            "types": [t.code for t in self.types],
            "action": self.action,
            "outcome": int(self.outcome),
            "time": self.at.isoformat(),
            "actor": self.actor,
            "participants": participants_json(self),
            "description": self.description,
        }


def participants_json(event: AuditEvent) -> list[str]:
    """Each participant as ``kind:id`` (``ae:``/``user:`` for people and peers, then objects)."""
    people = [f"{p.shown}@{p.address}" if p.address else p.shown for p in event.participants]
    return people + [o.label() for o in event.objects]


def _now() -> datetime:
    return datetime.now(UTC).astimezone()  # local offset, as a reader expects


@dataclass(frozen=True, slots=True)
class StudyObject:
    """A study as audit events name it: its UID, its patient and what it holds."""

    study_uid: str
    patient_id: str | None = None
    sop_classes: tuple[tuple[str, int], ...] = field(default=())
    accession: str | None = None
    patient_name: str | None = None


def study_objects(studies: Iterable[StudyObject]) -> tuple[ParticipantObject, ...]:
    """The study (type 2, role 3, 110180; its accession number and SOP classes described) and
    its patient (type 1, role 1, RFC 3881 "2", named by the patient's name when known)."""
    objects: list[ParticipantObject] = []
    patients: dict[str, str | None] = {}
    for study in studies:
        objects.append(
            ParticipantObject(
                study.study_uid,
                STUDY_UID,
                "2",
                "3",
                sop_classes=study.sop_classes,
                accession=study.accession,
            )
        )
        if study.patient_id and study.patient_id not in patients:
            patients[study.patient_id] = study.patient_name
    objects.extend(
        ParticipantObject(p, PATIENT_NUMBER, "1", "1", name=name) for p, name in patients.items()
    )
    return tuple(objects)


def node_participant(
    ae_title: str, *, requestor: bool = False, role: Code | None = None
) -> Participant:
    """The node: UserID its process identity, AlternativeUserID its AE title (A.5.2.2)."""
    return Participant(str(os.getpid()), requestor, role=role, alternative_id=AETITLES + ae_title)


def dicom_peer(
    ae_title: str,
    address: str | None,
    role: Code,
    *,
    requestor: bool = True,
    tls_subject: str | None = None,
) -> Participant:
    """A peer DICOM application, known by its AE title (its process is not ours to know);
    the subject of its TLS certificate as UserName."""
    return Participant(
        ae_title, requestor, address, role, alternative_id=AETITLES + ae_title, name=tls_subject
    )


# -- constructors, one per thing audited -----------------------------------------------------


def association(
    ae_title: str,
    calling_ae: str,
    address: str,
    *,
    accepted: bool,
    reason: str | None = None,
    tls_subject: str | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """An association request: accepted (informative) or rejected (an alert)."""
    peer = dicom_peer(calling_ae or "?", address, SOURCE, tls_subject=tls_subject)
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
        at or _now(),
        (peer, node_participant(ae_title, role=DESTINATION)),
        (ParticipantObject(ae_title, NODE_ID, "2", "4"),),
        (NODE_AUTHENTICATION,),
        description=reason,
    )


def security_alert(
    ae_title: str,
    kind: str,
    address: str | None,
    detail: str,
    *,
    calling_ae: str | None = None,
    tls_subject: str | None = None,
    repeats: int = 0,
    at: datetime | None = None,
) -> AuditEvent:
    """A Security Alert: ``kind`` "node-authentication" (a refused certificate, a rejected
    association) or anything else (hostile PDU, limit reached: Use of Restricted Function)."""
    type_code = NODE_AUTHENTICATION if kind == "node-authentication" else RESTRICTED_FUNCTION
    if calling_ae:
        peer = dicom_peer(calling_ae, address, SOURCE, tls_subject=tls_subject)
    else:
        peer = Participant(address or "unknown", True, address, SOURCE, name=tls_subject)
    text = f"{kind}: {detail}"
    if repeats:
        text += f" (and {repeats} more like it)"
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        Outcome.MINOR_FAILURE,
        at or _now(),
        (peer, node_participant(ae_title, role=DESTINATION)),
        (ParticipantObject(ae_title, NODE_ID, "2", "4"),),
        (type_code,),
        description=text,
    )


def study_received(
    ae_title: str, source: str, study: StudyObject, *, address: str | None = None
) -> AuditEvent:
    """110104 (C): a study has arrived from ``source`` (a calling AE or a STOW-RS user)."""
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        "C",
        Outcome.SUCCESS,
        _now(),
        (
            Participant(source, True, address, SOURCE)
            if ":" in source  # a web user ("user:ana"), else a calling AE
            else dicom_peer(source, address, SOURCE),
            node_participant(ae_title, role=DESTINATION),
        ),
        study_objects([study]),
    )


def results_sent(
    ae_title: str,
    destination: str,
    address: str | None,
    study: StudyObject,
    *,
    fhir: bool,
    ok: bool,
    reason: str | None = None,
) -> AuditEvent:
    """110104 (R) for C-STORE and STOW-RS, 110106 Export for FHIR: results left the node."""
    return AuditEvent(
        EXPORT if fhir else INSTANCES_TRANSFERRED,
        "R",
        Outcome.SUCCESS if ok else Outcome.SERIOUS_FAILURE,
        _now(),
        (
            node_participant(ae_title, requestor=True, role=SOURCE),
            # an Export's destination is its media (A.5.3.5): a FHIR server, by its URI
            Participant(destination, False, address, DESTINATION_MEDIA, media_type=URI_MEDIA)
            if fhir
            else Participant(destination, False, address, DESTINATION),
        ),
        study_objects([study]),
        description=reason,
    )


def query(user: str, address: str | None, ae_title: str, query_text: str) -> AuditEvent:
    """110112: a search (QIDO-RS, the study list), the query string as the query object."""
    return AuditEvent(
        QUERY,
        "E",
        Outcome.SUCCESS,
        _now(),
        (Participant(user, True, address, SOURCE), node_participant(ae_title, role=DESTINATION)),
        (
            ParticipantObject(
                STUDY_ROOT_FIND,
                SOP_CLASS_UID,
                "2",
                "3",  # Report, as A.5.3 asks of the query object
                query=query_text.encode("utf-8"),
            ),
        ),
    )


def instances_read(
    user: str, address: str | None, study: StudyObject, what: str = "read"
) -> AuditEvent:
    """110103 (R): a person read a study's data (page, API, WADO)."""
    return AuditEvent(
        INSTANCES_ACCESSED,
        "R",
        Outcome.SUCCESS,
        _now(),
        (Participant(user, True, address),),
        study_objects([study]),
        description=what,
    )


def user_authentication(
    user: str, address: str | None, *, login: bool, ok: bool, reason: str | None = None
) -> AuditEvent:
    """110114 Login (110122) or Logout (110123), success or minor failure."""
    return AuditEvent(
        USER_AUTHENTICATION,
        "E",
        Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
        _now(),
        (Participant(user or "unknown", True, address),),
        types=(LOGIN if login else LOGOUT,),
        description=reason,
    )


def application_activity(ae_title: str, *, start: bool, launcher: str | None = None) -> AuditEvent:
    """110100 Application Start (110120) or Stop (110121)."""
    participants = [node_participant(ae_title, requestor=launcher is None, role=APPLICATION)]
    if launcher:
        participants.append(Participant(launcher, True, role=APPLICATION_LAUNCHER))
    return AuditEvent(
        APPLICATION_ACTIVITY,
        "E",
        Outcome.SUCCESS,
        _now(),
        tuple(participants),
        types=(APPLICATION_START if start else APPLICATION_STOP,),
    )


def audit_log_used(user: str, log_uri: str, address: str | None = None) -> AuditEvent:
    """110101: someone read the audit log."""
    return AuditEvent(
        AUDIT_LOG_USED,
        "R",
        Outcome.SUCCESS,
        _now(),
        (Participant(user, True, address),),
        (ParticipantObject(log_uri, URI, "2", "13", name="Security Audit Log"),),
    )


def study_deleted(actor: str, study: StudyObject, reason: str) -> AuditEvent:
    """110105 (D): a study's data removed (retention)."""
    return AuditEvent(
        STUDY_DELETED,
        "D",
        Outcome.SUCCESS,
        _now(),
        (Participant(actor, True),),
        study_objects([study]),
        description=reason,
    )


OPERATION_ACTIONS = {"rerun": "C", "retry": "U", "cancel": "U", "release": "U", "reject": "D"}


def operator_action(
    actor: str,
    operation: str,
    study: StudyObject | None,
    *,
    ok: bool = True,
    detail: str | None = None,
) -> AuditEvent:
    """110103 with the action of ``operation`` (see :data:`OPERATION_ACTIONS`): the study and
    its patient as objects; none when the study is not known (never a made-up UID)."""
    objects = list(study_objects([study])) if study is not None else []
    if objects:
        first = objects[0]
        objects[0] = ParticipantObject(
            first.object_id,
            first.id_type,
            first.type_code,
            first.role,
            details=(("Operation", operation),),
            sop_classes=first.sop_classes,
            accession=first.accession,
        )
    return AuditEvent(
        INSTANCES_ACCESSED,
        OPERATION_ACTIONS.get(operation, "U"),
        Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
        _now(),
        (Participant(actor, True),),
        tuple(objects),
        description=detail or operation,
    )


def user_changed(
    actor: str, target_user: str, change: str, *, role_changed: bool = False
) -> AuditEvent:
    """110113 with 110137 (or 110136 for a role): an account or token created or changed."""
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        Outcome.SUCCESS,
        _now(),
        (Participant(actor, True),),
        (ParticipantObject(target_user, USER_IDENTIFIER, "1", "11"),),
        (SECURITY_ROLES_CHANGED if role_changed else USER_SECURITY_CHANGED,),
        description=change,
    )


@dataclass(frozen=True, slots=True)
class Alert:
    """A security alert to be recorded by the node's :class:`~pacs_node.audit.trail.AuditTrail`
    (which rate-limits them): what an SCP worker process sends over its pipe."""

    kind: str  # "node-authentication", "hostile-pdu", "limit-reached", ...
    address: str | None
    detail: str
    ae_title: str | None = None
    tls_subject: str | None = None
