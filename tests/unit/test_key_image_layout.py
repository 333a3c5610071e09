"""The key image's legend and banner never cover image pixels: below a wide image, beside a tall
one, and the image region of the picture is the windowed slice itself."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_node.imaging import load_series
from pacs_node.inference.labelmap import Algorithm, Labelmap, ModelInfo, SegmentSpec
from pacs_node.inference.vocabulary import structure
from pacs_node.results import ResultOptions, measure_labelmap
from pacs_node.results.overlay import KeyImageLayout, PixelBox, render_slice_layout
from pacs_node.results.provenance import Provenance
from tests.results_factory import box, make_series

SEGMENTS = (
    SegmentSpec(1, structure("liver")),
    SegmentSpec(2, structure("kidney_left")),
    SegmentSpec(3, structure("spleen")),
)
INFO = ModelInfo(
    algorithm=Algorithm(name="phantom-organs", version="1.0.0", description="test model"),
    modalities=("CT",),
    segments=SEGMENTS,
)
GREY_HU = 40  # the centre of the series' 40/400 window: mid grey


def _overlaps(a: PixelBox, b: PixelBox) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _render(rows: int, cols: int) -> tuple[np.ndarray, KeyImageLayout, tuple[int, int, int, int]]:
    """A uniform grey slice with three small organs at its centre; the picture, its layout and
    the organs' box in the picture's pixels (left, top, right, bottom)."""
    shape = (3, rows, cols)
    centre = (rows // 2, cols // 2)
    labels = np.zeros(shape, dtype=np.uint8)
    for value, dx in ((1, -6), (2, 0), (3, 6)):
        labels[box(shape, (0, centre[0] - 2, centre[1] + dx - 2), (3, 4, 4))] = value
    stored = np.full(shape, GREY_HU, dtype=np.int16)
    volume = load_series(make_series(stored))
    labelmap = Labelmap(labels, SEGMENTS)
    findings = measure_labelmap(volume, labelmap)
    provenance = Provenance.of(volume, labelmap, INFO, ResultOptions())
    picture, layout = render_slice_layout(volume, labelmap, 1, findings, provenance)
    scale = (layout.image[2] - layout.image[0]) // cols
    left, top = layout.image[:2]
    organs = (
        left + (centre[1] - 10) * scale,
        top + (centre[0] - 4) * scale,
        left + (centre[1] + 10) * scale,
        top + (centre[0] + 4) * scale,
    )
    return np.asarray(picture), layout, organs


@pytest.mark.parametrize(
    ("rows", "cols", "beside"),
    [
        (40, 400, False),  # wide and short: the legend goes below
        (64, 64, False),  # square: below
        (300, 60, True),  # tall and narrow: beside
    ],
)
def test_the_legend_never_covers_the_image(rows: int, cols: int, beside: bool) -> None:
    pixels, layout, organs = _render(rows, cols)
    assert pixels.shape[:2] == (layout.size[1], layout.size[0])
    assert layout.legend is not None
    assert not _overlaps(layout.legend, layout.image)
    assert not _overlaps(layout.banner, layout.image)
    assert not _overlaps(layout.banner, layout.legend)
    if beside:
        assert layout.legend[0] >= layout.image[2]
    else:
        assert layout.legend[1] >= layout.image[3]
    # the image region is the slice: uniform grey wherever no contour is drawn
    left, top, right, bottom = layout.image
    region = pixels[top:bottom, left:right].astype(np.int16)
    keep = np.ones(region.shape[:2], dtype=bool)
    keep[organs[1] - top : organs[3] - top, organs[0] - left : organs[2] - left] = False
    grey = region[keep]
    assert (grey == grey[0]).all()
    assert 100 < grey[0, 0] < 156  # mid grey, not the panels' black
    # the legend lists the three organs in their colours (its swatches)
    l_left, l_top, l_right, l_bottom = layout.legend
    legend = pixels[l_top:l_bottom, l_left:l_right].reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(legend, axis=0)}
    assert {s.structure.color for s in SEGMENTS} <= colours
