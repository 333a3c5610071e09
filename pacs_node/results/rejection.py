"""The IOCM rejection note: a Key Object Selection Document (PS3.3 A.35.4, built with highdicom)
that tells a PACS which of our objects a person rejected, and why.

IHE Radiology Imaging Object Change Management (IOCM) names the document title, from PS3.16
CID 7011 "Rejected for Quality Reasons" (113001, DCM) for a result that is wrong, or "Rejected
for Patient Safety Reasons" (113037, DCM) for one filed under the wrong patient; every rejected
instance is a content item and is listed in the Current Requested Procedure Evidence Sequence.
The note joins the rejected objects' study in a series of its own; its UIDs are derived from
what it rejects (see :func:`rejection_uids`), so a re-sent note is the same note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from pacs_node.errors import ResultsError
from pacs_node.outputs import OutputKind
from pacs_node.results.provenance import MANUFACTURER, copy_patient_study, uid_from
from pacs_node.review import RejectionKind

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
SERIES_NUMBER = 9900  # after the result series (see the writers' series numbers)


def title(kind: RejectionKind) -> Code:
    """The note's document title for ``kind`` (PS3.16 CID 7011)."""
    return Code(kind.code, "DCM", kind.meaning)


@dataclass(frozen=True)
class RejectionUids:
    series_instance_uid: str
    sop_instance_uid: str


def rejection_uids(rejected: Sequence[Dataset], kind: RejectionKind) -> RejectionUids:
    """The note's UIDs, from the study, the rejected SOP Instance UIDs and the title."""
    parts = [str(rejected[0].StudyInstanceUID), str(OutputKind.REJECTION), kind.code]
    parts += sorted(str(ds.SOPInstanceUID) for ds in rejected)
    return RejectionUids(uid_from(*parts, "series"), uid_from(*parts, "instance"))


def build_rejection_note(
    rejected: Sequence[Dataset], kind: RejectionKind, created: datetime
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS rejecting ``rejected`` (the headers of our stored objects, all of one study:
    patient and study attributes are copied from the first)."""
    if not rejected:
        raise ResultsError("a rejection note needs at least one rejected object")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ResultsError(f"the rejected objects belong to {len(studies)} studies, not one")
    uids = rejection_uids(rejected, kind)
    content = hd.ko.KeyObjectSelection(document_title=title(kind), referenced_objects=rejected)
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=rejected,
        content=content,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"Rejected: {kind.meaning}"[:64],
        content_date=created.strftime("%Y%m%d"),
        content_time=created.strftime("%H%M%S"),
    )
    copy_patient_study(rejected[0], note)
    return note
