"""The label vocabulary: unique names, standard codes where pydicom's code dictionary has them."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from pacs_node.inference.vocabulary import BY_NAME, STRUCTURES, UnknownStructure, structure

PYDICOM_NAMES = {
    "38266002": "EntireBody",
    "39607008": "Lung",
    "10200004": "Liver",
    "78961009": "Spleen",
    "64033007": "Kidney",
    "113197003": "Rib",
    "80891009": "Heart",
    "15825003": "Aorta",
    "272673000": "Bone",
    "7771000": "Left",
    "24028007": "Right",
    "85756007": "Tissue",
}


def test_names_are_unique_and_canonical() -> None:
    assert len(BY_NAME) == len(STRUCTURES)
    for name in ("body", "lung_left", "lung_right", "liver", "spleen", "kidney_left"):
        assert name in BY_NAME
    assert {"kidney_right", "spine", "ribs", "heart", "aorta", "bone"} <= set(BY_NAME)


@pytest.mark.parametrize("entry", STRUCTURES, ids=lambda s: s.name)
def test_codes_agree_with_the_standard_dictionary(entry: object) -> None:
    for concept in (entry.type, entry.modifier, entry.category):  # type: ignore[attr-defined]
        if concept is None:
            continue
        assert concept.scheme == "SCT"
        assert concept.value.isdigit()
        keyword = PYDICOM_NAMES.get(concept.value)
        if keyword is not None:
            assert getattr(codes.SCT, keyword).value == concept.value


def test_paired_organs_carry_laterality() -> None:
    assert structure("lung_left").modifier is not None
    assert structure("lung_left").modifier.meaning == "Left"  # type: ignore[union-attr]
    assert structure("kidney_right").modifier.meaning == "Right"  # type: ignore[union-attr]
    assert structure("liver").modifier is None


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownStructure, match="not in the vocabulary"):
        structure("pancreas_tail")
