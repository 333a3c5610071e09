"""Modality Performed Procedure Step SCP (PS3.4 F.7): what a scanner's N-CREATE and N-SET
say, checked and recorded in the catalog, so assembly can call a study stable as soon as the
scanner is done instead of waiting for the quiet period.

* N-CREATE: Performed Procedure Step Status must be IN PROGRESS (else 0x0106); the Study
  Instance UID comes from the Scheduled Step Attribute Sequence; a SOP Instance UID already
  known gets 0x0111; a calling AE with ``mpps_max_open_steps`` steps IN PROGRESS gets 0x0213.
  A Performed Series Sequence sent here is recorded too (a later N-SET's replaces it).
* N-SET: only the AE that created the step may set it (else 0x0124, and a security alert); an
  unknown step gets 0x0112; a step already COMPLETED or DISCONTINUED gets 0x0110 with Error ID
  0xA710; an attribute Table F.7.2-1 does not allow in an N-SET gets 0x0106 with the Attribute
  Identifier List. COMPLETED carries the Performed Series Sequence: every instance in each
  series' Referenced Image Sequence and Referenced Non-Image Composite SOP Instance Sequence is
  recorded; a step completed with none on record is "unlisted" (the quiet period decides).
* A message over :data:`MAX_MESSAGE_BYTES` is refused before it is decoded, and a catalog that
  fails answers 0x0213 (a modality retries that; 0x0110 is final to most).

The parsing functions are pure (a Dataset in, values or :class:`StepRefused` out); the
:class:`PerformedSteps` handler answers with a status and tells ``notify`` (assembly, directly
or over an SCP worker's pipe) which study to look at again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from pacs_node.catalog.clock import db_now
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import PerformedStepStatus
from pacs_node.catalog.mpps import (
    CreateOutcome,
    ListedInstance,
    SetOutcome,
    create_step,
    set_step,
)
from pacs_node.config import Settings
from pacs_node.statuses import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    INVALID_OBJECT_INSTANCE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_SOP_CLASS,
    NO_SUCH_SOP_INSTANCE,
    NOT_AUTHORISED,
    PERFORMED_STEP_ENDED,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from pacs_node.uids import is_valid_uid

log = logging.getLogger(__name__)

MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
# More instances than any one procedure step produces: a bigger list is refused, not stored.
MAX_LISTED_INSTANCES = 100_000
MAX_PERFORMED_SERIES = 10_000  # items of the Performed Series Sequence
# An encoded Attribute / Modification List bigger than this is refused before it is decoded:
# 100 000 listed instances take about 12 MB; a decoded data set costs several times its size.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Attributes PS3.4 Table F.7.2-1 marks "Not allowed" in an N-SET (they are the scheduling's, the
# patient's and the step's identity, fixed by the N-CREATE), and the SOP Common identity.
NOT_ALLOWED_IN_SET: frozenset[BaseTag] = frozenset(
    Tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "ScheduledStepAttributesSequence",
        "StudyInstanceUID",
        "ReferencedPatientSequence",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "PatientBirthDate",
        "PatientSex",
        "AdmissionID",
        "IssuerOfAdmissionIDSequence",
        "PerformedStationAETitle",
        "PerformedStationName",
        "PerformedLocation",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedProcedureStepID",
        "Modality",
        "StudyID",
    )
)

Notify = Callable[[str], object]
# kind, calling AE, detail: a security alert for the audit trail
Alerter = Callable[[str, str, str], object]


class StepRefused(Exception):
    """An N-CREATE or N-SET the node refuses: the DIMSE status, the Error Comment, and the
    Attribute Identifier List or Error ID where the status calls for them."""

    def __init__(
        self,
        status: int,
        comment: str,
        tags: Iterable[BaseTag] = (),
        error_id: int | None = None,
    ) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.tags = sorted(tags)
        self.error_id = error_id


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip("\0 ")
    return text or None


def _required(ds: Dataset, keyword: str, where: str) -> str:
    """A Type 1 value: absent is 0x0120 Missing attribute, present but empty 0x0121."""
    if keyword not in ds:
        raise StepRefused(MISSING_ATTRIBUTE, f"{where}{keyword} is missing", [Tag(keyword)])
    text = _text(ds, keyword)
    if text is None:
        raise StepRefused(MISSING_ATTRIBUTE_VALUE, f"{where}{keyword} is empty", [Tag(keyword)])
    return text


def _uid(ds: Dataset, keyword: str, where: str) -> str:
    text = _required(ds, keyword, where)
    if not is_valid_uid(text):
        raise StepRefused(
            INVALID_ATTRIBUTE_VALUE, f"{where}{keyword} is not a valid UID", [Tag(keyword)]
        )
    return text


def step_status(ds: Dataset) -> PerformedStepStatus | None:
    """Performed Procedure Step Status (0040,0252); None when the data set lacks it (present
    but empty: 0x0121)."""
    if "PerformedProcedureStepStatus" not in ds:
        return None
    text = _required(ds, "PerformedProcedureStepStatus", "")
    try:
        return PerformedStepStatus(text.upper())
    except ValueError:
        raise StepRefused(
            INVALID_ATTRIBUTE_VALUE,
            f"unknown Performed Procedure Step Status {text[:24]!r}",
            [Tag("PerformedProcedureStepStatus")],
        ) from None


def scheduled_study_uid(ds: Dataset) -> str:
    """The Study Instance UID of the first Scheduled Step Attribute Sequence item (every item
    of one step names the same study in practice; a step spanning studies is not supported)."""
    tag = Tag("ScheduledStepAttributesSequence")
    if tag not in ds:
        raise StepRefused(MISSING_ATTRIBUTE, "Scheduled Step Attributes Sequence is missing", [tag])
    items = ds[tag].value
    if not items:
        raise StepRefused(
            MISSING_ATTRIBUTE_VALUE, "Scheduled Step Attributes Sequence is empty", [tag]
        )
    uids = {_uid(item, "StudyInstanceUID", "Scheduled Step Attributes: ") for item in items}
    if len(uids) > 1:
        raise StepRefused(
            INVALID_ATTRIBUTE_VALUE, "the scheduled steps name several studies", [tag]
        )
    return uids.pop()


def performed_series(ds: Dataset) -> list[ListedInstance] | None:
    """The instances listed in the Performed Series Sequence (0040,0340): those of each
    series' Referenced Image Sequence and Referenced Non-Image Composite SOP Instance Sequence.
    None when the data set has no Performed Series Sequence (an N-SET that leaves it as is)."""
    if "PerformedSeriesSequence" not in ds:
        return None
    tag = Tag("PerformedSeriesSequence")
    series_items = ds.PerformedSeriesSequence or []
    if len(series_items) > MAX_PERFORMED_SERIES:
        raise StepRefused(
            INVALID_ATTRIBUTE_VALUE, f"more than {MAX_PERFORMED_SERIES} performed series", [tag]
        )
    listed: list[ListedInstance] = []
    for series in series_items:
        series_uid = _uid(series, "SeriesInstanceUID", "Performed Series: ")
        for keyword in (
            "ReferencedImageSequence",
            "ReferencedNonImageCompositeSOPInstanceSequence",
        ):
            for item in series.get(keyword) or []:
                sop_uid = _uid(item, "ReferencedSOPInstanceUID", "Performed Series: ")
                listed.append(ListedInstance(series_uid, sop_uid))
                if len(listed) > MAX_LISTED_INSTANCES:
                    raise StepRefused(
                        INVALID_ATTRIBUTE_VALUE,
                        f"more than {MAX_LISTED_INSTANCES} instances listed",
                        [tag],
                    )
    return listed


def refuse_not_allowed(ds: Dataset) -> None:
    """An N-SET may not change what Table F.7.2-1 marks "Not allowed": refused with 0x0106 and
    the offending tags rather than dropped with a success the scanner would believe."""
    offending = NOT_ALLOWED_IN_SET.intersection(ds.keys())
    if offending:
        raise StepRefused(INVALID_ATTRIBUTE_VALUE, "attributes an N-SET may not change", offending)


def _refusal(exc: StepRefused) -> Dataset:
    reply = Dataset()
    reply.Status = exc.status
    reply.ErrorComment = exc.comment[:64]
    if exc.tags:
        reply.AttributeIdentifierList = exc.tags
    if exc.error_id is not None:
        reply.ErrorID = exc.error_id
    return reply


def _too_big(size: int | None) -> None:
    if size is not None and size > MAX_MESSAGE_BYTES:
        raise StepRefused(
            RESOURCE_LIMITATION, f"data set of {size} bytes; at most {MAX_MESSAGE_BYTES}"
        )


class PerformedSteps:
    """The N-CREATE / N-SET logic; the SCP's handlers call it with what the event holds."""

    def __init__(
        self,
        settings: Settings,
        catalog: Callable[[], Catalog],
        notify: Notify | None = None,
        alert: Alerter | None = None,
    ) -> None:
        """``catalog``: the catalog the steps are written to (opened when first needed);
        ``notify``: told the Study Instance UID when a step ends, to look at the study again;
        ``alert``: told of an AE that tried to set another AE's step (the audit trail)."""
        self.settings = settings
        self._open = catalog
        self._catalog: Catalog | None = None
        self._opening = threading.Lock()  # the SCP answers on a thread per association
        self.notify = notify
        self.alert = alert

    def catalog(self) -> Catalog:
        with self._opening:
            if self._catalog is None:
                self._catalog = self._open()
            return self._catalog

    def _check(self, sop_class_uid: str, sop_instance_uid: object, calling_ae: str) -> str:
        if sop_class_uid != MODALITY_PERFORMED_PROCEDURE_STEP:
            raise StepRefused(NO_SUCH_SOP_CLASS, "not a Modality Performed Procedure Step")
        if not self.settings.mpps_for(calling_ae):
            raise StepRefused(NOT_AUTHORISED, "performed procedure steps not taken from this AE")
        uid = str(sop_instance_uid or "").strip("\0 ")
        if not is_valid_uid(uid):
            raise StepRefused(INVALID_OBJECT_INSTANCE, "no valid Affected SOP Instance UID")
        return uid

    def create(
        self,
        sop_class_uid: str,
        sop_instance_uid: object,
        calling_ae: str,
        attributes: Any,
        size: int | None = None,
    ) -> tuple[int | Dataset, None]:
        """N-CREATE: ``attributes`` is a callable giving the decoded Attribute List, ``size``
        its encoded length (checked before it is decoded)."""
        try:
            uid = self._check(sop_class_uid, sop_instance_uid, calling_ae)
            _too_big(size)
            ds = _decoded(attributes)
            status = step_status(ds)
            if status is None:
                raise StepRefused(
                    MISSING_ATTRIBUTE,
                    "Performed Procedure Step Status is missing",
                    [Tag("PerformedProcedureStepStatus")],
                )
            if status is not PerformedStepStatus.IN_PROGRESS:
                raise StepRefused(
                    INVALID_ATTRIBUTE_VALUE,
                    "a new step must be IN PROGRESS",
                    [Tag("PerformedProcedureStepStatus")],
                )
            study_uid = scheduled_study_uid(ds)
            listed = performed_series(ds)
            try:
                with self.catalog().sessions.begin() as session:
                    now = db_now(session)  # the clock assembly compares with
                    created = create_step(
                        session,
                        uid,
                        study_uid,
                        calling_ae,
                        now,
                        listed=listed,
                        max_open=self.settings.node.mpps_max_open_steps,
                    )
            except IntegrityError:
                created = CreateOutcome.DUPLICATE  # created by another process meanwhile
            if created is CreateOutcome.DUPLICATE:
                raise StepRefused(DUPLICATE_SOP_INSTANCE, "this SOP Instance UID is taken")
            if created is CreateOutcome.TOO_MANY_OPEN:
                raise StepRefused(
                    RESOURCE_LIMITATION,
                    f"{self.settings.node.mpps_max_open_steps} steps of this AE in progress",
                )
        except StepRefused as exc:
            return self._refused("N-CREATE", calling_ae, exc), None
        except SQLAlchemyError:
            log.exception("performed procedure step not recorded", extra={"calling_ae": calling_ae})
            return _refusal(StepRefused(RESOURCE_LIMITATION, "the catalog is unavailable")), None
        log.info(
            "performed procedure step in progress",
            extra={
                "calling_ae": calling_ae,
                "mpps_uid": uid,
                "study_uid": study_uid,
                "listed": None if listed is None else len(listed),
            },
        )
        return SUCCESS, None

    def update(
        self,
        sop_class_uid: str,
        sop_instance_uid: object,
        calling_ae: str,
        modifications: Any,
        size: int | None = None,
    ) -> tuple[int | Dataset, None]:
        """N-SET: ``modifications`` is a callable giving the decoded Modification List,
        ``size`` its encoded length (checked before it is decoded)."""
        try:
            uid = self._check(sop_class_uid, sop_instance_uid, calling_ae)
            _too_big(size)
            ds = _decoded(modifications)
            refuse_not_allowed(ds)
            status = step_status(ds)
            listed = performed_series(ds)
            with self.catalog().sessions.begin() as session:
                done = set_step(session, uid, status, listed, db_now(session), calling_ae)
            if done.outcome is SetOutcome.UNKNOWN:
                raise StepRefused(NO_SUCH_SOP_INSTANCE, "no such performed procedure step")
            if done.outcome is SetOutcome.FOREIGN:
                self._foreign(uid, calling_ae)
                raise StepRefused(NOT_AUTHORISED, "the step was created by another AE")
            if done.outcome is SetOutcome.ENDED:
                raise StepRefused(
                    PROCESSING_FAILURE,
                    f"the step is {done.status} already; no more changes",
                    error_id=PERFORMED_STEP_ENDED,
                )
        except StepRefused as exc:
            return self._refused("N-SET", calling_ae, exc), None
        except SQLAlchemyError:
            log.exception("performed procedure step not updated", extra={"calling_ae": calling_ae})
            return _refusal(StepRefused(RESOURCE_LIMITATION, "the catalog is unavailable")), None
        assert done.study_uid is not None
        log.info(
            "performed procedure step updated",
            extra={
                "calling_ae": calling_ae,
                "mpps_uid": uid,
                "study_uid": done.study_uid,
                "status": str(done.status),
                "listed": None if listed is None else len(listed),
            },
        )
        if done.status is not PerformedStepStatus.IN_PROGRESS:  # the study may be done now
            self._notify(done.study_uid)
        return SUCCESS, None

    def _foreign(self, uid: str, calling_ae: str) -> None:
        """An AE tried to set a step another AE created: a spoofed or misconfigured scanner."""
        detail = f"N-SET of performed procedure step {uid} created by another AE"
        log.warning(
            "security alert",
            extra={"kind": "mpps-foreign-step", "calling_ae": calling_ae, "detail": detail},
        )
        if self.alert is None:
            return
        try:
            self.alert("mpps-foreign-step", calling_ae, detail)
        except Exception:  # auditing never breaks the answer
            log.exception("security alert not handed over")

    def _refused(self, what: str, calling_ae: str, exc: StepRefused) -> Dataset:
        log.warning(
            "performed procedure step refused",
            extra={
                "calling_ae": calling_ae,
                "dimse": what,
                "status": f"0x{exc.status:04X}",
                "reason": exc.comment,
            },
        )
        return _refusal(exc)

    def _notify(self, study_uid: str) -> None:
        if self.notify is None:
            return
        try:
            self.notify(study_uid)
        except Exception:  # the step is recorded: the quiet period still ends the study
            log.exception("assembly not told of a performed procedure step")


def _decoded(source: Any) -> Dataset:
    """The decoded data set, every element read once: a malformed one is refused here, not
    half-way through the catalog write."""
    try:
        ds = source()
        for _element in ds.iterall():
            pass
    except StepRefused:
        raise
    except Exception as exc:
        raise StepRefused(PROCESSING_FAILURE, f"unreadable data set: {type(exc).__name__}") from exc
    if not isinstance(ds, Dataset):
        raise StepRefused(PROCESSING_FAILURE, "no data set")
    return ds
