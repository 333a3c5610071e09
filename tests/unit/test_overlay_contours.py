"""GSPS contours and references: tiny findings keep their traced outline after simplifying;
image references are checked per image (multi-frame or not, frame in range); the one private
highdicom method the annotations rely on still exists and still checks bounds."""

from __future__ import annotations

import itertools

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from pacs_node.results.overlay import _area, _References, slice_contours

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _mask(*pixels: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((8, 8), dtype=bool)
    for row, col in pixels:
        mask[row, col] = True
    return mask


@pytest.mark.parametrize(
    ("pixels", "area"),
    [
        (((3, 3),), 0.5),  # one pixel: its traced diamond
        (((3, 3), (3, 4)), 1.5),  # one by two
        (((3, 3), (4, 4)), 1.0),  # a diagonal pair: two diamonds
    ],
)
def test_a_tiny_finding_keeps_an_outline_with_area(
    pixels: tuple[tuple[int, int], ...], area: float
) -> None:
    contours = slice_contours(_mask(*pixels))
    assert contours
    for points in contours:
        assert len({tuple(p) for p in points}) >= 4  # a polygon, never a line or a triangle
        assert np.allclose(points[0], points[-1])  # closed
    assert sum(_area(p) for p in contours) == pytest.approx(area)
    for row, col in pixels:  # every pixel centre (index + 0.5) lies inside an outline
        centre = (col + 0.5, row + 0.5)
        assert any(_inside(p, centre) for p in contours)


def test_a_large_finding_is_still_simplified() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    rows, cols = np.ogrid[:64, :64]
    mask[(rows - 32) ** 2 + (cols - 32) ** 2 < 20**2] = True
    (points,) = slice_contours(mask)
    traced_points = 4 * 40  # a staircase outline has about this many points
    assert len(points) < traced_points / 2
    assert _area(points) == pytest.approx(mask.sum(), rel=0.05)


def _inside(polygon: np.ndarray, point: tuple[float, float]) -> bool:
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in itertools.pairwise(polygon):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _image(sop_class: str, frames: int | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 16, 16
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def test_references_check_each_image_for_frames() -> None:
    references = _References()
    assert references.item(_image(CT), None).ReferencedSOPClassUID == CT
    assert references.item(_image(ENHANCED_CT, 3), 2).ReferencedFrameNumber == 2
    # a single-frame image of the same class after a multi-frame one: no frame allowed
    with pytest.raises(ValueError, match="no frames"):
        references.item(_image(CT), 1)
    assert "ReferencedFrameNumber" not in references.item(_image(ENHANCED_CT, 3), None)
    with pytest.raises(ValueError, match="frame 4"):  # past this image's own frames
        references.item(_image(ENHANCED_CT, 3), 4)
    assert references.item(_image(ENHANCED_CT, 5), 4).ReferencedFrameNumber == 4


def test_highdicom_still_has_the_coordinate_check_the_annotations_call() -> None:
    """``_Annotation`` calls highdicom's private ``GraphicAnnotation._check_coords`` once per
    graphic; a highdicom that drops or changes it must fail here, not in production."""
    check = hd.pr.GraphicAnnotation._check_coords
    image = _image(CT)
    pixel = hd.pr.AnnotationUnitsValues.PIXEL
    check(np.array([[0.5, 0.5], [16.0, 16.0]]), image, pixel)  # inside: no error
    # (highdicom 0.28 takes the least column from the rows: a negative column is not caught)
    for outside in ([[0.5, 0.5], [0.5, 16.5]], [[16.5, 1.0], [1.0, 1.0]], [[1.0, -0.5]]):
        with pytest.raises(ValueError, match="outside the valid range"):
            check(np.array(outside), image, pixel)
