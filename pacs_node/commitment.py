"""Storage Commitment Push Model (PS3.4 Annex J) as both sides of the node meet it: the SOP
class and its message numbers, and the reading of an N-EVENT-REPORT's Event Information.

The receiver takes reports a PACS sends on its own association (:mod:`pacs_node.ingest.scp`);
the C-STORE sender asks for commitment and reads the report on its own association
(:mod:`pacs_node.dispatch.commitment`). Both read a report the same way, here.
"""

from __future__ import annotations

from pydicom import Dataset

from pacs_node.refs import CommitmentReport
from pacs_node.statuses import PROCESSING_FAILURE

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
COMMITTED_ALL = 1  # N-EVENT-REPORT Event Type IDs
FAILURES_EXIST = 2


def parse_report(
    transaction_uid: str, calling_ae: str, info: Dataset, peer_address: str | None = None
) -> CommitmentReport:
    """The instances an N-EVENT-REPORT's Event Information commits and refuses; who sent it
    (AE title, address) decides later which deliveries it may settle."""
    committed = tuple(
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in info.get("ReferencedSOPSequence", [])
    )
    failed = tuple(
        (
            str(item.get("ReferencedSOPInstanceUID", "")),
            int(item.get("FailureReason", PROCESSING_FAILURE)),
        )
        for item in info.get("FailedSOPSequence", [])
    )
    return CommitmentReport(calling_ae, transaction_uid, committed, failed, peer_address)
