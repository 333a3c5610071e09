"""What a site may choose about its result objects; everything else follows the standards."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from pacs_node.outputs import OutputKind
from pacs_node.quality.limits import QualityLimits

DEFAULT_SERIES_NUMBERS: Mapping[OutputKind, int] = {
    OutputKind.SEG: 9001,
    OutputKind.SR: 9002,
    OutputKind.GSPS: 9003,
    OutputKind.KEY_IMAGES: 9004,
    OutputKind.PDF: 9005,
}


@dataclass(frozen=True)
class FhirOptions:
    """How the EHR knows the patient and the order; the node never guesses either."""

    # Identifier system of PatientID, by IssuerOfPatientID; ``patient_system`` when unmapped.
    patient_system: str = "urn:oid:1.2.826.0.1.3680043.10.1234.1"
    issuer_systems: Mapping[str, str] = field(default_factory=dict)
    # Identifier system under which the EHR files accession numbers on ServiceRequest.
    accession_system: str = "urn:oid:1.2.826.0.1.3680043.10.1234.2"
    # A literal ServiceRequest reference ("ServiceRequest/123") when the caller already knows it;
    # otherwise basedOn is a logical reference by accession number.
    service_request: str | None = None
    # Test systems only: also create the Patient (conditionally) when the EHR has none.
    create_patient: bool = False


@dataclass(frozen=True)
class ResultOptions:
    """Series numbers, which encodings and images to build, and the FHIR identity rules."""

    series_numbers: Mapping[OutputKind, int] = field(
        default_factory=lambda: dict(DEFAULT_SERIES_NUMBERS)
    )
    instance_number: int = 1
    jpeg2000_copy: bool = False  # a second, JPEG 2000 lossless SEG encoding dispatch may choose
    key_images: int = 4  # how many key slices; 0 for none
    key_images_every_finding_slice: bool = False
    device_serial_number: str = "pacs-node"
    institution_name: str | None = None
    fhir: FhirOptions = field(default_factory=FhirOptions)
    # The identity rules of each FHIR destination by name: one Bundle is built for each, since
    # two EHRs may know the same patient under different identifier systems.
    fhir_destinations: Mapping[str, FhirOptions] = field(default_factory=dict)
    # When the objects are built; fixed in tests so output is reproducible. None: now (UTC).
    created: datetime | None = None
    # The quality gate's limits (None: no gate) and whether a failed check is named in the
    # SR, the PDF and the FHIR report (a route's ``qa: flag``).
    quality: QualityLimits | None = None
    quality_flag: bool = False
    # How many earlier results of this model on this series a person rejected: part of every
    # object's UIDs when above 0, so a re-run after an IOCM rejection never re-uses a SOP
    # Instance UID the PACS has marked rejected (the EHR's report keeps its one identifier).
    revision: int = 0

    def series_number(self, kind: OutputKind) -> int:
        return int(self.series_numbers.get(kind, DEFAULT_SERIES_NUMBERS.get(kind, 9000)))
