"""Classical CT localisation on synthetic CTs with known anatomy and on real CT slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from scipy import ndimage

from pacs_node.imaging.volume import load_series
from pacs_node.inference.classical import (
    BODY,
    BONE,
    FILL_SLAB,
    LUNG_LEFT,
    LUNG_RIGHT,
    fill_slices,
    segment_ct,
)
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from tests.ct_phantom import Phantom, dice, make_ct_phantom

MODELS = Path(__file__).resolve().parents[2] / "models"
LPS = np.eye(3)


@pytest.fixture(scope="module", params=[(11, (32, 224, 224), (5.0, 1.8, 1.8)),
                                        (12, (40, 240, 240), (3.0, 1.6, 1.6))])  # fmt: skip
def phantom(request: pytest.FixtureRequest) -> Phantom:
    seed, shape, spacing = request.param
    return make_ct_phantom(seed, shape=shape, spacing=spacing)


def _scores(labels: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "body": dice(labels > 0, truth["body"]),
        "lung_left": dice(labels == LUNG_LEFT, truth["lung_left"]),
        "lung_right": dice(labels == LUNG_RIGHT, truth["lung_right"]),
        "bone": dice(labels == BONE, truth["bone"]),
    }


def test_phantom_dice(phantom: Phantom) -> None:
    labels = segment_ct(phantom.hu, phantom.spacing, LPS)
    scores = _scores(labels, phantom.truth)
    assert scores["body"] >= 0.95, scores
    assert scores["lung_left"] >= 0.90, scores
    assert scores["lung_right"] >= 0.90, scores
    assert scores["bone"] >= 0.80, scores


def test_table_is_not_body(phantom: Phantom) -> None:
    labels = segment_ct(phantom.hu, phantom.spacing, LPS)
    # clear of the skin's partial-volume rim: 3 voxels (~5 mm) out
    outside = ~ndimage.binary_dilation(phantom.truth["body"], iterations=3)
    dense_outside = outside & (phantom.hu > -500)
    assert dense_outside.sum() > 1000  # the table is in the image ...
    assert not (labels[dense_outside] > 0).any()  # ... and never labelled


def test_left_and_right_follow_the_patient_not_the_image(phantom: Phantom) -> None:
    """Columns running to the patient's right and slices running down (a proper rotation):
    the lung on the patient's left is still lung_left."""
    flipped = np.ascontiguousarray(phantom.hu[::-1, :, ::-1])
    direction = np.diag([-1.0, 1.0, -1.0])
    labels = segment_ct(flipped, phantom.spacing, direction)[::-1, :, ::-1]
    scores = _scores(labels, phantom.truth)
    assert scores["lung_left"] >= 0.90, scores
    assert scores["lung_right"] >= 0.90, scores


def test_air_only_gives_nothing() -> None:
    labels = segment_ct(np.full((4, 32, 32), -1000, dtype=np.int16), (2.0, 1.0, 1.0), LPS)
    assert not labels.any()


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "693_J2KI.dcm"])
def test_real_head_ct_slice_body_without_head_rest(name: str) -> None:
    """A 512x512 head CT slice lying in a U-shaped head rest (carbon shells on both sides and
    below the head): the body is the head, one piece, and no head-rest pixel is labelled."""
    volume = load_series([get_testdata_file(name)])
    result = Runner(Registry(MODELS)).segment("ct-classical", volume)
    labels = result.labelmap.labels[0]
    hu = volume.voxels[0]
    body = labels > 0
    parts, _count = ndimage.label(body)
    sizes = np.bincount(parts.ravel())[1:]
    assert sizes.max() >= 0.99 * body.sum()  # one piece (a few hair pixels may stand apart)
    area_cm2 = body.sum() * volume.spacing[1] * volume.spacing[2] / 100.0
    assert 150.0 < area_cm2 < 260.0  # an adult head cross-section
    assert labels[256, 256] == BODY  # the brain in the middle of the image
    # the head rest: dense pixels at the sides (columns < 100, > 430) and below (rows > 470)
    rest = np.zeros_like(body)
    rest[:, :100] = rest[:, 430:] = True
    rest[470:, :] = True
    rest &= hu > -500
    assert rest.sum() > 1500
    assert not body[rest].any()
    # the skull is bone, enclosing the brain
    assert (labels == BONE).sum() * volume.spacing[1] * volume.spacing[2] > 2000.0  # > 20 cm2
    assert not (labels == LUNG_LEFT).any()
    assert not (labels == LUNG_RIGHT).any()


def test_fill_slices_fills_each_slice_on_its_own_across_slabs() -> None:
    """Worked slab by slab, the per-slice filling is the same as 2D hole filling slice by slice."""
    rng = np.random.default_rng(3)
    mask = rng.random((2 * FILL_SLAB + 5, 40, 40)) > 0.55
    expected = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    assert expected.sum() > mask.sum()  # there were holes to fill
    assert np.array_equal(fill_slices(mask), expected)
