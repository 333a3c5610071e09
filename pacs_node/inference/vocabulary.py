"""The canonical label vocabulary: one name per structure, stable across model versions.

Every model's labels map onto these names; SEG, SR, FHIR and the dashboard take codes and colours
from here, so a structure is coded the same way whichever model found it. Codes are SNOMED CT
concepts as DICOM uses them in segmentations (PS3.16 CID 7150 category, CID 7151/7166 types);
laterality is the type's modifier (left / right), as PS3.16 recommends for paired organs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_node.errors import PacsNodeError


@dataclass(frozen=True, slots=True)
class CodedConcept:
    """(value, scheme designator, meaning) as DICOM and FHIR both carry it."""

    value: str
    scheme: str
    meaning: str


ANATOMICAL_STRUCTURE = CodedConcept("123037004", "SCT", "Anatomical Structure")
TISSUE = CodedConcept("85756007", "SCT", "Tissue")
LEFT = CodedConcept("7771000", "SCT", "Left")
RIGHT = CodedConcept("24028007", "SCT", "Right")


@dataclass(frozen=True, slots=True)
class Structure:
    """One entry of the vocabulary: what a label value of any model may stand for."""

    name: str
    display: str
    category: CodedConcept
    type: CodedConcept
    modifier: CodedConcept | None
    color: tuple[int, int, int]  # recommended display colour, sRGB


def _organ(
    name: str,
    display: str,
    code: tuple[str, str],
    color: tuple[int, int, int],
    modifier: CodedConcept | None = None,
    category: CodedConcept = ANATOMICAL_STRUCTURE,
) -> Structure:
    return Structure(
        name, display, category, CodedConcept(code[0], "SCT", code[1]), modifier, color
    )


STRUCTURES: tuple[Structure, ...] = (
    _organ("body", "Body", ("38266002", "Entire body"), (177, 122, 101)),
    _organ("lung", "Lungs", ("39607008", "Lung"), (197, 165, 145)),
    _organ("lung_left", "Left lung", ("39607008", "Lung"), (128, 174, 128), LEFT),
    _organ("lung_right", "Right lung", ("39607008", "Lung"), (111, 184, 210), RIGHT),
    _organ("liver", "Liver", ("10200004", "Liver"), (221, 130, 101)),
    _organ("spleen", "Spleen", ("78961009", "Spleen"), (157, 108, 162)),
    _organ("kidney_left", "Left kidney", ("64033007", "Kidney"), (185, 102, 83), LEFT),
    _organ("kidney_right", "Right kidney", ("64033007", "Kidney"), (216, 101, 79), RIGHT),
    _organ("spine", "Spine", ("421060004", "Spinal column"), (241, 214, 145)),
    _organ("ribs", "Ribs", ("113197003", "Rib"), (253, 232, 158)),
    _organ("heart", "Heart", ("80891009", "Heart"), (206, 110, 84)),
    _organ("aorta", "Aorta", ("15825003", "Aorta"), (224, 97, 76)),
    _organ("bone", "Bone", ("272673000", "Bone"), (230, 170, 40), category=TISSUE),
    _organ("bowel", "Bowel", ("113276009", "Intestine"), (205, 167, 142)),
)

BY_NAME: dict[str, Structure] = {s.name: s for s in STRUCTURES}


class UnknownStructure(PacsNodeError):
    """A label name that is not in the vocabulary."""


def structure(name: str) -> Structure:
    try:
        return BY_NAME[name]
    except KeyError as exc:
        known = ", ".join(sorted(BY_NAME))
        raise UnknownStructure(f"label {name!r} is not in the vocabulary ({known})") from exc
