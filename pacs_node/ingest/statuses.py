"""The one table from ingest errors to C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 C): every
status the node's SCP answers a C-STORE with, and no other name (docs/conformance.md 4.4 lists
them). The standard's numbers are named in :mod:`pacs_node.statuses`; the node's own low bytes
here."""

from __future__ import annotations

from pacs_node.errors import (
    DataSetMismatch,
    IdentityConflict,
    IngestError,
    InvalidUID,
    MissingAttribute,
    OutOfResources,
    ResendRefused,
    StudyBeingRemoved,
    UnreadableDataset,
)
from pacs_node.statuses import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)

__all__ = [
    "CANNOT_UNDERSTAND",
    "CANNOT_UNDERSTAND_INVALID_UID",
    "CANNOT_UNDERSTAND_MISSING_UID",
    "CANNOT_UNDERSTAND_UNREADABLE",
    "DATASET_MISMATCH",
    "IDENTITY_CONFLICT",
    "OUT_OF_RESOURCES",
    "OUT_OF_RESOURCES_STUDY_BEING_REMOVED",
    "PROCESSING_FAILURE",
    "RESEND_REFUSED",
    "SUCCESS",
    "status_for",
]

# Failure: Error: Cannot understand (0xC000-0xCFFF); the low byte says what we could not read.
CANNOT_UNDERSTAND_UNREADABLE = 0xC001
CANNOT_UNDERSTAND_MISSING_UID = 0xC002
CANNOT_UNDERSTAND_INVALID_UID = 0xC003
# Refused: Out of Resources, for now: retention is removing the study (send again later).
OUT_OF_RESOURCES_STUDY_BEING_REMOVED = 0xA710
# Failure: Error (0xC0xx, our own low bytes): the identity check refused the instance: its
# UIDs or patient collide with another study's (identity_conflict: reject) ...
IDENTITY_CONFLICT = 0xC010
# ... or a SOP Instance already held came again with other bytes (resend_policy: reject).
RESEND_REFUSED = 0xC011

_TABLE: tuple[tuple[type[IngestError], int], ...] = (
    (StudyBeingRemoved, OUT_OF_RESOURCES_STUDY_BEING_REMOVED),
    (OutOfResources, OUT_OF_RESOURCES),
    (IdentityConflict, IDENTITY_CONFLICT),
    (ResendRefused, RESEND_REFUSED),
    (DataSetMismatch, DATASET_MISMATCH),
    (UnreadableDataset, CANNOT_UNDERSTAND_UNREADABLE),
    (MissingAttribute, CANNOT_UNDERSTAND_MISSING_UID),
    (InvalidUID, CANNOT_UNDERSTAND_INVALID_UID),
)


def status_for(error: BaseException) -> int:
    """The C-STORE status for ``error``; unexpected errors are a processing failure."""
    for cls, status in _TABLE:
        if isinstance(error, cls):
            return status
    if isinstance(error, IngestError):
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE
