"""Who made a result and from what: deterministic UIDs, the model as Contributing Equipment,
series descriptions, and the source attributes every object copies.

UIDs are ``2.25.<n>`` with ``n`` the integer of a UUID (version 5) over (source study, source
series, model, model version, labelmap digest, output kind, part): a retry of the same result
re-sends the same UIDs, which a PACS de-duplicates; a re-run whose labels differ gets new ones,
and so does a re-run after a person rejected the result (its revision is a part too).
The Device UID of the model depends on name and version only, so it changes with each version.
"""

from __future__ import annotations

import copy
import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from pacs_node import __version__
from pacs_node.imaging.volume import Volume
from pacs_node.inference.labelmap import Algorithm, Labelmap, ModelInfo
from pacs_node.inference.vocabulary import CodedConcept
from pacs_node.outputs import OutputKind
from pacs_node.results import codes
from pacs_node.results.options import ResultOptions

CHARSET = "ISO_IR 192"
MANUFACTURER = "pacs-node"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-node:results")
_MAX_LO = 64

# Patient and study attributes every result object carries from its source (PS3.3 C.7.1.1,
# C.7.2.1); read through pydicom, so they decode whatever SpecificCharacterSet the source used.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
# Type 2 attributes of the Patient and General Study modules: present, if empty, in every object we
# write; a source that leaves them out (many do) gets them empty rather than failing the build.
TYPE2_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def uid_from(*parts: str) -> str:
    """A ``2.25`` UID from a UUID5 of the parts (at most 44 characters, always valid)."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '|'.join(parts)).int}"


def labelmap_digest(labelmap: Labelmap) -> str:
    """What the model found, hashed: labels, their meanings and any probabilities."""
    digest = hashlib.sha256()
    digest.update(str(labelmap.labels.shape).encode())
    digest.update(labelmap.labels.astype("<u2").tobytes())
    for spec in labelmap.segments:
        digest.update(f"{spec.value}:{spec.structure.name}".encode())
    for value, prob in sorted((labelmap.probabilities or {}).items()):
        digest.update(str(value).encode())
        digest.update(prob.astype("<f4").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """The identity of one result set: source, model, UIDs and the common descriptive values."""

    volume: Volume
    model: ModelInfo
    options: ResultOptions
    digest: str
    created: datetime

    @classmethod
    def of(
        cls, volume: Volume, labelmap: Labelmap, model: ModelInfo, options: ResultOptions
    ) -> Provenance:
        created = options.created or datetime.now(UTC)
        return cls(volume, model, options, labelmap_digest(labelmap), created)

    @property
    def source(self) -> Dataset:
        """The first source header: patient, study and frame of reference come from it."""
        return self.volume.headers[0]

    @property
    def algorithm(self) -> Algorithm:
        return self.model.algorithm

    @property
    def study_uid(self) -> str:
        return str(self.source.StudyInstanceUID)

    def uid(self, kind: OutputKind, part: str = "") -> str:
        """Deterministic UID for (source, model, version, result, kind, part), and the
        revision after a rejection (:attr:`ResultOptions.revision`) when there is one."""
        revision = self.options.revision
        return uid_from(
            self.study_uid,
            self.volume.series_instance_uid,
            self.algorithm.name,
            self.algorithm.version,
            self.digest,
            str(kind),
            part,
            *((f"revision-{revision}",) if revision else ()),
        )

    @property
    def report_uid(self) -> str:
        """The EHR report's identity: the same for every run of this model (any version, any
        labels) on this series, so a re-run updates the one DiagnosticReport the EHR holds."""
        return uid_from(
            self.study_uid,
            self.volume.series_instance_uid,
            self.algorithm.name,
            str(OutputKind.FHIR),
            "report",
        )

    def series_uid(self, kind: OutputKind) -> str:
        return self.uid(kind, "series")

    def instance_uid(self, kind: OutputKind, index: int = 0) -> str:
        return self.uid(kind, f"instance-{index}")

    @property
    def device_uid(self) -> str:
        """The model as a device: new with each model version."""
        return uid_from("device", self.algorithm.name, self.algorithm.version)

    def description(self, what: str) -> str:
        """Series description naming what the object is and the model with its version."""
        text = f"{what} {self.algorithm.name} {self.algorithm.version}"
        return text[:_MAX_LO]

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """The model as Contributing Equipment (IHE AIR), with its version and Device UID.

        highdicom accepts only CID 7005 purposes, so the item is built as Processing Equipment
        and its purpose then replaced by IHE AIR's code.
        """
        item = hd.ContributingEquipment(
            manufacturer=self.algorithm.manufacturer,
            purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.algorithm.name[:_MAX_LO],
            software_versions=self.algorithm.version,
            contribution_description=(self.algorithm.description or "AI segmentation")[:_MAX_LO],
            contribution_datetime=self.created,
        )
        item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(code(codes.PROCESSING_ALGORITHM))
        ]
        item.DeviceUID = self.device_uid
        return item

    @property
    def software_version(self) -> str:
        return f"{__version__}"


def code(concept: CodedConcept) -> Code:
    """Our CodedConcept as pydicom's Code, which highdicom takes."""
    return Code(concept.value, concept.scheme, concept.meaning)


# Dates highdicom converts (DA): one that is not a DICOM date (YYYYMMDD) would fail every
# highdicom object of the study (a dashed birth date from an older system), so those objects
# leave it empty (type 2); copy_patient_study still copies it as received.
DATE_KEYWORDS = ("PatientBirthDate", "StudyDate")
_DA = re.compile(r"\d{8}")


def _invalid_date(ds: Dataset, keyword: str) -> bool:
    value = ds[keyword].value if keyword in ds else None
    return bool(value) and not _DA.fullmatch(str(value).strip())


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy patient and study attributes as decoded text (type 2 ones empty where the source has
    none); the target is written in UTF-8."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            value = source[keyword].value
            setattr(target, keyword, str(value) if keyword.endswith("Name") else value)
        elif keyword in TYPE2_PATIENT_STUDY_KEYWORDS:
            setattr(target, keyword, None)
    target.SpecificCharacterSet = CHARSET


def utf8_sources(volume: Volume) -> list[Dataset]:
    """Source headers with text decoded and re-labelled UTF-8, so copies of patient and study
    attributes read right whatever character set the source used."""
    out: list[Dataset] = []
    for header in volume.headers:
        ds = copy.deepcopy(header)
        _convert_all(ds)
        ds.SpecificCharacterSet = CHARSET
        for keyword in TYPE2_PATIENT_STUDY_KEYWORDS:
            if keyword not in ds or (keyword in DATE_KEYWORDS and _invalid_date(ds, keyword)):
                setattr(ds, keyword, None)
        out.append(ds)
    return out


def _convert_all(ds: Dataset) -> None:
    """Turn every raw element into a value decoded with the source's own character set."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_all(item)


def kind_label(kind: OutputKind) -> str:
    return {
        OutputKind.SEG: "AI SEG",
        OutputKind.SEG_JPEG2000: "AI SEG",
        OutputKind.SR: "AI SR",
        OutputKind.GSPS: "AI PR",
        OutputKind.KEY_IMAGES: "AI Key images",
        OutputKind.PDF: "AI Report",
    }.get(kind, "AI")


def source_patient_orientation(source: Dataset) -> list[str] | None:
    """A source image's own Patient Orientation to copy onto its SEG and key images, for 2D
    images without direction cosines (radiographs): never invented from the grid's placeholder
    axes, which would claim L\\P whatever the image shows. ``[]`` when it has none (left
    empty: type 2C); ``None`` when the direction cosines say it."""
    if "ImageOrientationPatient" in source:
        return None
    values = [str(v).upper() for v in source.get("PatientOrientation") or []]
    return values if len(values) == 2 and all(values) else []
