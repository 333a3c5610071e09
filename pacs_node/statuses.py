"""DIMSE status numbers, named once (PS3.7 Annex C, PS3.4 B.2.3), and how a sender reads them.

The C-STORE answers of the node's own SCP, and the errors that lead to each, are the table in
:mod:`pacs_node.ingest.statuses`; the numbers it shares with the standard are named here.
"""

from __future__ import annotations

SUCCESS = 0x0000
# Warnings a C-STORE SCP may answer; the instance is stored all the same.
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_MISMATCH_WARNING = 0xB007
STORED = frozenset(
    {SUCCESS, COERCION_OF_DATA_ELEMENTS, ELEMENTS_DISCARDED, DATASET_MISMATCH_WARNING}
)
# Failures of any DIMSE service (PS3.7 C.4); the N-CREATE / N-SET ones of PS3.7 10.1
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NOT_AUTHORISED = 0x0124
NO_SUCH_EVENT_TYPE = 0x0113
NO_SUCH_SOP_CLASS = 0x0118
SOP_CLASS_NOT_SUPPORTED = 0x0122
RESOURCE_LIMITATION = 0x0213
# Error ID (0000,0903) of an MPPS N-SET on a step already COMPLETED or DISCONTINUED (PS3.4 F.7.2.2)
PERFORMED_STEP_ENDED = 0xA710
# C-STORE failures: the first of each range (0xA7xx, 0xA9xx, 0xCxxx); the low byte is the SCP's.
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def is_stored(status: int) -> bool:
    """Whether a C-STORE answer means the peer has the instance (success or a warning)."""
    return status in STORED


def is_refused_for_good(status: int) -> bool:
    """Whether a C-STORE failure will not change by sending again: the SOP class refused, the
    data set not matching it, or the peer unable to understand it. Out of resources (0xA7xx),
    a processing failure and any other status may pass."""
    return (
        status == SOP_CLASS_NOT_SUPPORTED
        or _in_range(status, DATASET_MISMATCH, 0xFF)
        or _in_range(status, CANNOT_UNDERSTAND, 0xFFF)
    )


def _in_range(status: int, first: int, span: int) -> bool:
    return first <= status <= first + span
