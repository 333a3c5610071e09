"""The label vocabulary: unique names, standard codes where pydicom's code dictionary has them,
laterality only on paired structures, colours told apart at a glance."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from pydicom.sr.codedict import codes
from skimage.color import deltaE_ciede2000, rgb2lab  # type: ignore[import-untyped,unused-ignore]

from pacs_node.inference.registry import Registry
from pacs_node.inference.vocabulary import (
    BY_NAME,
    STRUCTURES,
    Laterality,
    UnknownStructure,
    structure,
)

MODELS = Path(__file__).resolve().parents[2] / "models"
MIN_DELTA_E = 20.0  # CIEDE2000: two colours this far apart are told apart at a glance
# A coarse label and the finer ones it stands for: no model outputs both in one labelmap.
ALTERNATIVES = {
    frozenset(pair)
    for pair in (("bone", "spine"), ("bone", "ribs"), ("lung", "lung_left"), ("lung", "lung_right"))
}

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


def test_only_paired_structures_are_lateralised() -> None:
    paired = {s.name for s in STRUCTURES if s.paired}
    assert paired == {"lung", "lung_left", "lung_right", "kidney_left", "kidney_right"}
    assert structure("lung_left").laterality is Laterality.LEFT
    assert structure("kidney_right").laterality is Laterality.RIGHT
    assert structure("lung").laterality is None  # paired, side found from the mask
    assert Laterality.BILATERAL.concept.value == codes.SCT.RightAndLeft.value  # CID 244
    one_piece = {s.name for s in STRUCTURES if s.one_piece}
    assert "body" in one_piece
    assert not one_piece & {"spine", "ribs", "aorta", "bone", "bowel", "lung"}


def delta_e(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    lab = rgb2lab(np.array([[a, b]], dtype=np.float64) / 255.0)[0]
    return float(deltaE_ciede2000(lab[0], lab[1]))


def test_colours_of_any_two_structures_differ_at_a_glance() -> None:
    close = [
        (a.name, b.name, round(delta_e(a.color, b.color), 1))
        for a, b in itertools.combinations(STRUCTURES, 2)
        if frozenset((a.name, b.name)) not in ALTERNATIVES
        and delta_e(a.color, b.color) < MIN_DELTA_E
    ]
    assert not close
    for left, right in (("lung_left", "lung_right"), ("kidney_left", "kidney_right")):
        assert delta_e(structure(left).color, structure(right).color) >= MIN_DELTA_E


@pytest.mark.parametrize("name", Registry(MODELS).names())
def test_colours_of_each_shipped_model_differ_at_a_glance(name: str) -> None:
    """What one model outputs together, with any colour its bundle sets itself."""
    segments = Registry(MODELS).get(name).segments
    assert len(segments) >= 2
    for a, b in itertools.combinations(segments, 2):
        distance = delta_e(a.structure.color, b.structure.color)
        assert distance >= MIN_DELTA_E, (name, a.name, b.name, distance)
