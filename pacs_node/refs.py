"""Small values that cross module lines: UIDs plus the few tags routing and the catalog need."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


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


def header_order(instance_number: int | None, sop_instance_uid: str) -> tuple[bool, int, str]:
    """Sort key of a series' instances: by Instance Number, unnumbered ones last, then by SOP
    Instance UID; the instances first and last in it are the ones routing reads a series by."""
    return (instance_number is None, instance_number or 0, sop_instance_uid)


Equipment = tuple[str | None, tuple[tuple[str, str], ...]]
"""One Contributing Equipment item: its Manufacturer and its purposes' (Code Value, Coding
Scheme Designator) pairs."""


@dataclass(frozen=True, slots=True)
class RoutingHeader:
    """What routing reads of one instance's header (up to the Shared Functional Groups), taken
    once, from the data set as it arrives, by :func:`~pacs_node.ingest.header.read_routing_header`.

    Values are as the data set holds them (an enhanced IOD's geometry from its Shared Functional
    Groups); judging them is routing's job. The catalog keeps it as JSON for the instances that
    lead and end each series, so routing reads no file for a series it recorded.
    """

    modality: str | None = None
    sop_class_uid: str | None = None
    manufacturer: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    image_type: tuple[str, ...] = ()
    series_number: int | None = None
    number_of_frames: int | None = None
    # Requested Procedure Description, then each Request Attributes item's Requested Procedure
    # and Scheduled Procedure Step Descriptions, then its Requested Procedure Codes' meanings
    requested_procedures: tuple[str, ...] = ()
    procedure_codes: tuple[str, ...] = ()  # Procedure Code Sequence meanings
    image_position_patient: tuple[float, ...] | None = None
    image_orientation_patient: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    columns: int | None = None
    reconstruction_diameter: float | None = None
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    contributing_equipment: tuple[Equipment, ...] = ()

    def __reduce__(self) -> tuple[type[RoutingHeader], tuple[Any, ...]]:
        """Pickled as its values: it crosses from each SCP worker to the recorder with every
        instance, and this takes half the time of the dataclass default."""
        return (RoutingHeader, tuple(getattr(self, name) for name in self.__dataclass_fields__))

    def to_json(self) -> dict[str, Any]:
        """Only the attributes present: a plain dict that ``json`` can write."""
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutingHeader:
        """The inverse of :meth:`to_json` (JSON lists back to tuples); unknown keys ignored."""
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name not in data or data[name] is None:
                continue
            value = data[name]
            if name == "contributing_equipment":
                value = tuple(
                    (maker, tuple((str(c), str(s)) for c, s in codes)) for maker, codes in value
                )
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)


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
    # What routing reads of the header, taken in the same pass as ``header``; None where the
    # recorder got none (routing then reads the spooled file).
    routing: RoutingHeader | None = None

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
