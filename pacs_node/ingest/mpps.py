"""Modality Performed Procedure Step SCP (PS3.4 F.7): what a scanner's N-CREATE and N-SET
say, checked and recorded in the catalog, so assembly can call a study stable as soon as the
scanner is done instead of waiting for the quiet period.

* N-CREATE: Performed Procedure Step Status must be IN PROGRESS (else 0x0106); the Study
  Instance UID comes from the Scheduled Step Attribute Sequence; a SOP Instance UID already
  known gets 0x0111.
* N-SET: an unknown step gets 0x0112; a step already COMPLETED or DISCONTINUED gets 0x0110
  with an Error Comment. COMPLETED carries the Performed Series Sequence: every instance in
  each series' Referenced Image Sequence and Referenced Non-Image Composite SOP Instance
  Sequence is recorded.

The parsing functions are pure (a Dataset in, values or :class:`StepRefused` out); the
:class:`PerformedSteps` handler answers with a status and tells ``notify`` (assembly, directly
or over an SCP worker's pipe) which study to look at again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from pacs_node.catalog.clock import db_now
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import PerformedStepStatus
from pacs_node.catalog.mpps import ListedInstance, SetOutcome, create_step, set_step
from pacs_node.config import Settings
from pacs_node.statuses import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    INVALID_OBJECT_INSTANCE,
    MISSING_ATTRIBUTE,
    NO_SUCH_SOP_CLASS,
    NO_SUCH_SOP_INSTANCE,
    NOT_AUTHORISED,
    PROCESSING_FAILURE,
    SUCCESS,
)
from pacs_node.uids import is_valid_uid

log = logging.getLogger(__name__)

MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
# More instances than any one procedure step produces: a bigger list is refused, not stored.
MAX_LISTED_INSTANCES = 100_000

Notify = Callable[[str], object]


class StepRefused(Exception):
    """An N-CREATE or N-SET the node refuses: the DIMSE status and the Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip("\0 ")
    return text or None


def _uid(ds: Dataset, keyword: str, where: str) -> str:
    text = _text(ds, keyword)
    if text is None:
        raise StepRefused(MISSING_ATTRIBUTE, f"{where}{keyword} is missing")
    if not is_valid_uid(text):
        raise StepRefused(INVALID_ATTRIBUTE_VALUE, f"{where}{keyword} is not a valid UID")
    return text


def step_status(ds: Dataset) -> PerformedStepStatus | None:
    """Performed Procedure Step Status (0040,0252); None when the data set lacks it."""
    text = _text(ds, "PerformedProcedureStepStatus")
    if text is None:
        return None
    try:
        return PerformedStepStatus(text.upper())
    except ValueError:
        raise StepRefused(
            INVALID_ATTRIBUTE_VALUE, f"unknown Performed Procedure Step Status {text[:24]!r}"
        ) from None


def scheduled_study_uid(ds: Dataset) -> str:
    """The Study Instance UID of the first Scheduled Step Attribute Sequence item (every item
    of one step names the same study in practice; a step spanning studies is not supported)."""
    items = ds.get("ScheduledStepAttributesSequence")
    if not items:
        raise StepRefused(MISSING_ATTRIBUTE, "Scheduled Step Attributes Sequence is missing")
    uids = {_uid(item, "StudyInstanceUID", "Scheduled Step Attributes: ") for item in items}
    if len(uids) > 1:
        raise StepRefused(INVALID_ATTRIBUTE_VALUE, "the scheduled steps name several studies")
    return uids.pop()


def performed_series(ds: Dataset) -> list[ListedInstance] | None:
    """The instances listed in the Performed Series Sequence (0040,0340): those of each
    series' Referenced Image Sequence and Referenced Non-Image Composite SOP Instance Sequence.
    None when the data set has no Performed Series Sequence (an N-SET that leaves it as is)."""
    if "PerformedSeriesSequence" not in ds:
        return None
    listed: list[ListedInstance] = []
    for series in ds.PerformedSeriesSequence or []:
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
                    )
    return listed


def _refusal(status: int, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = status
    reply.ErrorComment = comment[:64]
    return reply


class PerformedSteps:
    """The N-CREATE / N-SET logic; the SCP's handlers call it with what the event holds."""

    def __init__(
        self, settings: Settings, catalog: Callable[[], Catalog], notify: Notify | None = None
    ) -> None:
        """``catalog``: the catalog the steps are written to (opened when first needed);
        ``notify``: told the Study Instance UID after each change, to look at it again."""
        self.settings = settings
        self._open = catalog
        self._catalog: Catalog | None = None
        self.notify = notify

    def catalog(self) -> Catalog:
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
        self, sop_class_uid: str, sop_instance_uid: object, calling_ae: str, attributes: Any
    ) -> tuple[int | Dataset, None]:
        """N-CREATE: ``attributes`` is a callable giving the decoded Attribute List."""
        try:
            uid = self._check(sop_class_uid, sop_instance_uid, calling_ae)
            ds = _decoded(attributes)
            status = step_status(ds)
            if status is None:
                raise StepRefused(MISSING_ATTRIBUTE, "Performed Procedure Step Status is missing")
            if status is not PerformedStepStatus.IN_PROGRESS:
                raise StepRefused(INVALID_ATTRIBUTE_VALUE, "a new step must be IN PROGRESS")
            study_uid = scheduled_study_uid(ds)
            try:
                with self.catalog().sessions.begin() as session:
                    now = db_now(session)  # the clock assembly compares with
                    created = create_step(session, uid, study_uid, calling_ae, now)
            except IntegrityError:
                created = False  # created by another process meanwhile
            if not created:
                raise StepRefused(DUPLICATE_SOP_INSTANCE, "this SOP Instance UID is taken")
        except StepRefused as exc:
            return self._refused("N-CREATE", calling_ae, exc), None
        except SQLAlchemyError:
            log.exception("performed procedure step not recorded", extra={"calling_ae": calling_ae})
            return _refusal(PROCESSING_FAILURE, "the catalog is unavailable"), None
        log.info(
            "performed procedure step in progress",
            extra={"calling_ae": calling_ae, "mpps_uid": uid, "study_uid": study_uid},
        )
        self._notify(study_uid)
        return SUCCESS, None

    def update(
        self, sop_class_uid: str, sop_instance_uid: object, calling_ae: str, modifications: Any
    ) -> tuple[int | Dataset, None]:
        """N-SET: ``modifications`` is a callable giving the decoded Modification List."""
        try:
            uid = self._check(sop_class_uid, sop_instance_uid, calling_ae)
            ds = _decoded(modifications)
            status = step_status(ds)
            listed = performed_series(ds)
            with self.catalog().sessions.begin() as session:
                done = set_step(session, uid, status, listed, db_now(session))
            if done.outcome is SetOutcome.UNKNOWN:
                raise StepRefused(NO_SUCH_SOP_INSTANCE, "no such performed procedure step")
            if done.outcome is SetOutcome.ENDED:
                raise StepRefused(
                    PROCESSING_FAILURE, f"the step is {done.status} already; no more changes"
                )
        except StepRefused as exc:
            return self._refused("N-SET", calling_ae, exc), None
        except SQLAlchemyError:
            log.exception("performed procedure step not updated", extra={"calling_ae": calling_ae})
            return _refusal(PROCESSING_FAILURE, "the catalog is unavailable"), None
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
        return _refusal(exc.status, exc.comment)

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
