"""The canonical label vocabulary: one name per structure, stable across model versions.

Every model's labels map onto these names; SEG, SR, FHIR and the dashboard take codes and colours
from here, so a structure is coded the same way whichever model found it. Codes are SNOMED CT
concepts as DICOM uses them in segmentations (PS3.16 CID 7150 category, CID 7151/7166 types);
laterality is the type's modifier (left / right), as PS3.16 recommends for paired organs.

Laterality belongs to paired structures only (``paired``): lungs and kidneys. The spine, heart,
aorta, liver, spleen, bowel and the body are unpaired; the ribs are paired bones but the label
holds the whole rib cage of both sides as one set, and ``bone`` every bone, so neither carries a
laterality (it would always read "bilateral" and say nothing). ``one_piece`` marks structures
that are one connected piece in a patient, so a result in several pieces is reported as such.

Colours are chosen so that any two structures differ by a CIEDE2000 distance of at least 20
(``tests/unit/test_vocabulary.py``), except a coarse label and the finer ones it stands for,
which no model outputs together (``bone`` / ``spine``, ``ribs``; ``lung`` / ``lung_left``,
``lung_right``): lungs in blues, bone in ivory and straw, liver brown, heart dark red, aorta
coral red, the body a muted skin tone that does not dominate.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

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
BILATERAL = CodedConcept("51440002", "SCT", "Bilateral")  # PS3.16 CID 244 Laterality


class Laterality(StrEnum):
    """The side of a paired structure (PS3.16 CID 244), as results state it."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"

    @property
    def concept(self) -> CodedConcept:
        return {"left": LEFT, "right": RIGHT, "bilateral": BILATERAL}[self.value]

    @classmethod
    def of_modifier(cls, modifier: CodedConcept | None) -> Laterality | None:
        """The laterality a type modifier names (None for no modifier or another one)."""
        if modifier is None:
            return None
        return {LEFT.value: cls.LEFT, RIGHT.value: cls.RIGHT, BILATERAL.value: cls.BILATERAL}.get(
            modifier.value
        )


@dataclass(frozen=True, slots=True)
class Structure:
    """One entry of the vocabulary: what a label value of any model may stand for."""

    name: str
    display: str
    category: CodedConcept
    type: CodedConcept
    modifier: CodedConcept | None
    color: tuple[int, int, int]  # recommended display colour, sRGB
    paired: bool = False  # one of a left/right pair: only these carry a laterality
    one_piece: bool = False  # one connected piece in a patient

    @property
    def laterality(self) -> Laterality | None:
        """The side the structure's own name states (its modifier), if any."""
        return Laterality.of_modifier(self.modifier)


def _organ(
    name: str,
    display: str,
    code: tuple[str, str],
    color: tuple[int, int, int],
    modifier: CodedConcept | None = None,
    category: CodedConcept = ANATOMICAL_STRUCTURE,
    *,
    paired: bool = False,
    one_piece: bool = False,
) -> Structure:
    return Structure(
        name,
        display,
        category,
        CodedConcept(code[0], "SCT", code[1]),
        modifier,
        color,
        paired=paired or modifier is not None,
        one_piece=one_piece,
    )


STRUCTURES: tuple[Structure, ...] = (
    _organ("body", "Body", ("38266002", "Entire body"), (185, 158, 143), one_piece=True),
    _organ("lung", "Lungs", ("39607008", "Lung"), (140, 170, 240), paired=True),
    _organ("lung_left", "Left lung", ("39607008", "Lung"), (50, 110, 230), LEFT, one_piece=True),
    _organ("lung_right", "Right lung", ("39607008", "Lung"), (50, 195, 210), RIGHT, one_piece=True),
    _organ("liver", "Liver", ("10200004", "Liver"), (135, 72, 25), one_piece=True),
    _organ("spleen", "Spleen", ("78961009", "Spleen"), (140, 70, 180), one_piece=True),
    _organ(
        "kidney_left", "Left kidney", ("64033007", "Kidney"), (245, 150, 15), LEFT, one_piece=True
    ),
    _organ(
        "kidney_right",
        "Right kidney",
        ("64033007", "Kidney"),
        (235, 85, 165),
        RIGHT,
        one_piece=True,
    ),
    _organ("spine", "Spine", ("421060004", "Spinal column"), (255, 252, 220)),
    _organ("ribs", "Ribs", ("113197003", "Rib"), (222, 204, 50)),
    _organ("heart", "Heart", ("80891009", "Heart"), (190, 0, 45), one_piece=True),
    _organ("aorta", "Aorta", ("15825003", "Aorta"), (255, 95, 95)),
    _organ("bone", "Bone", ("272673000", "Bone"), (242, 232, 196), category=TISSUE),
    _organ("bowel", "Bowel", ("113276009", "Intestine"), (115, 170, 85)),
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
