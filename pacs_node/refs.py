"""Small values that cross module lines: UIDs plus the few tags routing and the catalog need."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The identifying attributes of one instance, decoded in its own character set."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None = None
    instance_number: int | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One spooled instance as the catalog records it; never a whole Dataset."""

    header: InstanceHeader
    transfer_syntax_uid: str
    path: str  # relative to the spool root
    size_bytes: int
    received_at: datetime
    calling_ae: str | None = None
    sha256: str | None = None  # of the data set as received (see ingest.spool)
    # Who sent it where no AE title says so: the user who stored it over STOW-RS.
    sender: str | None = None
    # Decided by the receiver already (see ingest.identity): a quarantine reason code when the
    # file at ``path`` is in the spool's quarantine area and must join no study; ``replaces``
    # when the file at ``path`` was swapped for a corrected re-send (``resend_policy: replace``).
    quarantine_reason: str | None = None
    replaces: bool = False

    @property
    def study_uid(self) -> str:
        return self.header.study_uid

    @property
    def series_uid(self) -> str:
        return self.header.series_uid

    @property
    def sop_instance_uid(self) -> str:
        return self.header.sop_instance_uid


@dataclass(frozen=True, slots=True)
class CommitmentReport:
    """A Storage Commitment N-EVENT-REPORT, as a PACS sent it on an association of its own."""

    calling_ae: str
    transaction_uid: str
    committed: tuple[str, ...]  # SOP Instance UIDs the PACS keeps
    failed: tuple[tuple[str, int], ...]  # (SOP Instance UID, Failure Reason) it does not
    peer_address: str | None = None  # the IP address the association came from
