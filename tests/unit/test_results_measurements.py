"""Measurements on phantoms of known geometry are within 2% of the analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom import Dataset

from pacs_node.imaging import Volume, load_series
from pacs_node.inference.labelmap import Labelmap, SegmentSpec
from pacs_node.inference.vocabulary import Laterality, structure
from pacs_node.results import Side, measure_labelmap
from pacs_node.results.measurements import MIDLINE_MM, measure_segment
from tests.results_factory import AXIAL, ball, box, make_series, oblique_orientation

LIVER = SegmentSpec(1, structure("liver"))


def _volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: tuple[float, ...] = AXIAL,
) -> Volume:
    return load_series(
        make_series(np.zeros(shape, np.int16), spacing=spacing, orientation=orientation)
    )


def close(value: float | None, expected: float, tolerance: float = 0.02) -> bool:
    return value is not None and abs(value / expected - 1) <= tolerance


@pytest.mark.parametrize(
    ("spacing", "orientation"),
    [((1.0, 1.0, 1.0), AXIAL), ((1.25, 0.8, 0.8), AXIAL), ((1.0, 1.0, 1.0), oblique_orientation())],
)
def test_sphere_matches_analytic_values(
    spacing: tuple[float, float, float], orientation: tuple[float, ...]
) -> None:
    radius = 25.0
    shape = tuple(int(70 / s) for s in spacing)
    volume = _volume(shape, spacing, orientation)  # type: ignore[arg-type]
    finding = measure_segment(volume, ball(shape, spacing, radius), LIVER, midline_x=0.0)  # type: ignore[arg-type]
    assert close(finding.volume_ml, 4 / 3 * math.pi * radius**3 / 1000)
    assert close(finding.surface_area_mm2, 4 * math.pi * radius**2)
    assert close(finding.max_diameter_mm, 2 * radius)
    assert close(finding.sphericity, 1.0)
    assert finding.components == 1
    if orientation == AXIAL:
        for extent in (finding.extent_lr_mm, finding.extent_ap_mm, finding.extent_si_mm):
            assert close(extent, 2 * radius)


@pytest.mark.parametrize(
    ("spacing", "orientation"),
    [((1.0, 1.0, 1.0), AXIAL), ((1.25, 0.8, 0.8), AXIAL), ((1.0, 1.0, 1.0), oblique_orientation())],
)
def test_box_matches_analytic_values(
    spacing: tuple[float, float, float], orientation: tuple[float, ...]
) -> None:
    sizes = np.array([60.0, 80.0, 120.0])  # along z, y, x of the array
    shape = tuple(round((n + 8) / s) for n, s in zip(sizes, spacing, strict=True))
    volume = _volume(shape, spacing, orientation)  # type: ignore[arg-type]
    counts = tuple(round(n / s) for n, s in zip(sizes, spacing, strict=True))
    finding = measure_segment(volume, box(shape, (3, 3, 3), counts), LIVER, midline_x=0.0)  # type: ignore[arg-type]
    area = 2 * (sizes[0] * sizes[1] + sizes[1] * sizes[2] + sizes[0] * sizes[2])
    assert close(finding.volume_ml, float(np.prod(sizes)) / 1000)
    assert close(finding.surface_area_mm2, area)
    assert close(finding.max_diameter_mm, float(np.linalg.norm(sizes)))
    assert close(finding.sphericity, math.pi ** (1 / 3) * (6 * np.prod(sizes)) ** (2 / 3) / area)
    # Extents along L/R, A/P, S/I: the box's edges (array x, y, z) projected on patient axes.
    direction = np.asarray(volume.direction)
    edges = np.column_stack(
        [direction[:, 0] * sizes[2], direction[:, 1] * sizes[1], direction[:, 2] * sizes[0]]
    )
    expected = np.abs(edges).sum(axis=1)
    got = (finding.extent_lr_mm, finding.extent_ap_mm, finding.extent_si_mm)
    for value, analytic in zip(got, expected, strict=True):
        assert close(value, float(analytic))
    assert finding.slice_range == (3, 3 + counts[0] - 1)


def test_cranio_caudal_range_side_and_intensity() -> None:
    spacing = (2.0, 1.0, 1.0)
    shape = (20, 40, 40)
    stored = np.full(shape, -100, np.int16)
    mask = box(shape, (5, 10, 28), (4, 6, 8))  # patient left (+x), slices 5..8
    stored[mask] = 50
    stored[mask & (np.indices(shape)[2] == 28)] = 10
    volume = load_series(make_series(stored, spacing=spacing))
    labels = np.where(mask, 2, 0).astype(np.uint8)
    labelmap = Labelmap(
        labels, (SegmentSpec(2, structure("kidney_left")), SegmentSpec(5, structure("spleen")))
    )
    kidney, spleen = measure_labelmap(volume, labelmap)
    assert kidney.centroid_side is Side.LEFT
    assert kidney.laterality is Laterality.LEFT
    assert kidney.slice_range == (5, 8)
    top, bottom = kidney.craniocaudal_mm  # type: ignore[misc]
    assert top - bottom == pytest.approx(8.0)
    # z grows along the normal (S), so the last slice is the superior one
    assert top == pytest.approx(volume.index_to_patient((8, 0, 0))[2] + 1.0)
    stats = kidney.intensity
    assert stats is not None
    assert stats.hounsfield
    assert stats.minimum == 10
    assert stats.maximum == 50
    values = stored[mask].astype(float)
    assert stats.mean == pytest.approx(values.mean())
    assert stats.sd == pytest.approx(values.std())
    # an absent structure has no numbers at all, not zeros
    assert not spleen.present
    assert spleen.volume_ml is None
    assert spleen.intensity is None
    assert spleen.measurements() == ()


def test_components_and_midline() -> None:
    spacing = (1.0, 1.0, 1.0)
    shape = (20, 40, 41)
    mask = box(shape, (2, 2, 2), (4, 4, 4)) | box(shape, (10, 20, 18), (4, 4, 5))
    volume = _volume(shape, spacing)
    finding = measure_segment(
        volume, mask, LIVER, midline_x=float(volume.index_to_patient((0, 0, 20))[0])
    )
    assert finding.components == 2
    centred = measure_segment(
        volume,
        box(shape, (10, 20, 18), (4, 4, 5)),
        LIVER,
        midline_x=float(volume.index_to_patient((0, 0, 20))[0]),
    )
    assert centred.centroid_side is Side.MIDLINE
    assert centred.laterality is None  # the liver is not paired


# (structure, first and last x voxel of the mask relative to the midline voxel, laterality,
# whether the centroid contradicts the name, label every renderer shows)
LATERALITY_CASES = [
    ("spine", (-4, 4), None, False, "Spine"),
    ("spine", (-30, -15), None, False, "Spine"),  # off-centre, still no "Spine (right)"
    ("heart", (0, 25), None, False, "Heart"),
    ("body", (-28, 28), None, False, "Body"),
    ("ribs", (-28, -20), None, False, "Ribs"),  # the rib cage as one set: not lateralised
    ("lung", (-25, 25), Laterality.BILATERAL, False, "Lungs (bilateral)"),
    ("lung", (2, 25), Laterality.LEFT, False, "Lungs (left)"),
    ("lung", (-25, 4), Laterality.RIGHT, False, "Lungs (right)"),
    ("lung", (-int(MIDLINE_MM), int(MIDLINE_MM)), None, False, "Lungs"),  # within the band
    ("lung_left", (5, 25), Laterality.LEFT, False, "Left lung"),
    ("kidney_right", (-14, -2), Laterality.RIGHT, False, "Right kidney"),  # within tolerance
    ("lung_left", (-25, -5), Laterality.LEFT, True, "Left lung"),  # swapped by the model
    ("kidney_right", (12, 20), Laterality.RIGHT, True, "Right kidney"),
]


@pytest.mark.parametrize(
    ("name", "span", "laterality", "conflict", "label"),
    LATERALITY_CASES,
    ids=[f"{c[0]}{c[1]}" for c in LATERALITY_CASES],
)
def test_laterality_only_for_paired_structures(
    name: str,
    span: tuple[int, int],
    laterality: Laterality | None,
    conflict: bool,
    label: str,
) -> None:
    shape = (6, 20, 61)  # 1 mm pixels: x voxel k lies k - 30 mm from the midline voxel 30
    volume = _volume(shape, (2.0, 1.0, 1.0))
    midline = float(volume.index_to_patient((0, 0, 30))[0])
    mask = box(shape, (1, 5, 30 + span[0]), (3, 8, span[1] - span[0] + 1))
    finding = measure_segment(volume, mask, SegmentSpec(1, structure(name)), midline_x=midline)
    assert finding.laterality is laterality
    assert finding.side_conflict is conflict
    assert finding.label == label
    warned = [w for w in finding.warnings() if "midline" in w]
    assert bool(warned) is conflict
    if conflict:
        side = "right" if finding.midline_offset_mm < 0 else "left"  # type: ignore[operator]
        assert f"to the patient's {side} of the midline" in warned[0]
        assert warned[0].startswith(label)


def test_a_structure_that_is_one_piece_is_reported_in_pieces() -> None:
    shape = (10, 30, 40)
    volume = _volume(shape, (2.0, 1.0, 1.0))
    two = box(shape, (1, 2, 2), (3, 6, 6)) | box(shape, (6, 15, 20), (3, 6, 6))
    body = measure_segment(volume, two, SegmentSpec(1, structure("body")), midline_x=0.0)
    assert body.components == 2
    assert body.fragmented
    expected = "Body: in 2 separate parts where one is expected; read its numbers with care"
    assert body.warnings() == (expected,)
    # vertebrae and the ribs may be separate pieces: no warning
    spine = measure_segment(volume, two, SegmentSpec(2, structure("spine")), midline_x=0.0)
    assert spine.components == 2
    assert not spine.fragmented
    assert spine.warnings() == ()
    # diagonal neighbours are one piece, as the 26-connected count has it
    diagonal = box(shape, (1, 2, 2), (2, 2, 2)) | box(shape, (3, 4, 4), (2, 2, 2))
    single = measure_segment(volume, diagonal, SegmentSpec(1, structure("body")))
    assert single.components == 1
    assert not single.fragmented


def test_planar_image_has_area_and_no_volume() -> None:
    ds = make_series(np.zeros((1, 50, 60), np.int16), spacing=(1.0, 0.5, 0.4))[0]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    volume = load_series([ds])
    mask = box(volume.shape, (0, 10, 10), (1, 20, 25))
    finding = measure_segment(volume, mask, LIVER)
    assert finding.volume_ml is None
    assert finding.max_diameter_mm is None
    assert finding.area_cm2 == pytest.approx(20 * 25 * 0.5 * 0.4 / 100)
    assert finding.width_mm == pytest.approx(25 * 0.4)
    assert finding.height_mm == pytest.approx(20 * 0.5)
    assert [m.key for m in finding.measurements()][:2] == ["area", "intensity_mean"]
    # without Patient Orientation a lung keeps the side its name states, and says it is unchecked
    lung = measure_segment(volume, mask, SegmentSpec(2, structure("lung_left")))
    assert (lung.laterality, lung.centroid_side, lung.side_conflict) == (
        Laterality.LEFT,
        None,
        False,
    )
    assert lung.side_unchecked == "the image carries no Patient Orientation"
    assert lung.warnings() == (
        "Left lung: its side cannot be checked (the image carries no Patient Orientation)",
    )
    assert measure_segment(volume, mask, LIVER).warnings() == ()


def _radiograph(orientation: list[str] | None, spacing: bool = True) -> Volume:
    ds = make_series(np.zeros((1, 100, 120), np.int16), spacing=(1.0, 0.5, 0.5))[0]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    if not spacing:
        del ds.PixelSpacing
    if orientation is not None:
        ds.PatientOrientation = orientation
    return load_series([ds])


@pytest.mark.parametrize("spacing", [True, False])
@pytest.mark.parametrize(
    ("orientation", "left_lung_at", "side"),
    [
        (["L", "F"], 90, Side.LEFT),  # as a PA chest is read: the patient's left on the right
        (["L", "F"], 20, Side.RIGHT),
        (["R", "F"], 20, Side.LEFT),  # stored mirrored, and saying so
        (["F", "L"], 20, None),  # rotated: the rows run left-right; left lung near the top
    ],
)
def test_radiograph_sides_come_from_patient_orientation(
    orientation: list[str], left_lung_at: int, side: Side | None, spacing: bool
) -> None:
    volume = _radiograph(orientation, spacing)
    mask = box(volume.shape, (0, 5, left_lung_at), (1, 20, 10))  # columns 20-29 or 90-99
    lung = measure_segment(volume, mask, SegmentSpec(1, structure("lung_left")))
    if side is None:  # rows 5-24 of 100: F\L puts the patient's left below, so this is right
        side = Side.RIGHT
    assert lung.centroid_side is side
    assert lung.side_conflict is (side is Side.RIGHT)
    assert lung.side_unchecked is None
    if lung.side_conflict:
        assert "patient's right half of the image (by Patient Orientation" in lung.warnings()[0]
    if spacing and orientation == ["L", "F"]:
        assert lung.midline_offset_mm == pytest.approx((left_lung_at + 4.5 - 59.5) * 0.5)


def test_a_lateral_radiograph_cannot_check_sides() -> None:
    volume = _radiograph(["A", "F"])
    mask = box(volume.shape, (0, 30, 90), (1, 20, 10))
    lung = measure_segment(volume, mask, SegmentSpec(1, structure("lung_right")))
    assert not lung.side_conflict
    assert lung.side_unchecked == "Patient Orientation A\\F has no left-right axis"


def test_unknown_spacing_leaves_sizes_absent() -> None:
    ds = make_series(np.zeros((1, 30, 30), np.int16))[0]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    volume = load_series([ds])
    finding = measure_segment(volume, box(volume.shape, (0, 5, 5), (1, 5, 5)), LIVER)
    assert finding.area_cm2 is None
    assert finding.width_mm is None
    assert finding.voxel_count == 25
    assert [u.key for u in finding.unmeasured()] == ["area", "width", "height"]
    assert finding.size_text() == "area not measurable (no pixel spacing)"
    assert finding.size_basis == ""


def test_ultrasound_without_calibrated_regions_is_not_measurable() -> None:
    ds = make_series(np.zeros((1, 30, 30), np.int16), modality="US")[0]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    region = Dataset()
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 0  # none: not calibrated
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = [region]
    volume = load_series([ds])
    finding = measure_segment(volume, box(volume.shape, (0, 5, 5), (1, 5, 5)), LIVER)
    assert not volume.spacing_known
    assert finding.area_cm2 is None
    assert [m.key for m in finding.measurements() if m.unit.value in ("cm2", "mm")] == []
    assert [u.key for u in finding.unmeasured()] == ["area", "width", "height"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_diameter_equals_brute_force(seed: int) -> None:
    from scipy.spatial import distance

    from pacs_node.results.measurements import _max_diameter

    rng = np.random.default_rng(seed)
    # an elongated, lumpy cloud: many hull vertices, a diameter that farthest-point hops can miss
    points = rng.normal(size=(4000, 3)) * np.array([40.0, 15.0, 8.0])
    points[:50] += rng.normal(scale=30.0, size=(50, 3))
    expected = float(distance.pdist(points).max())
    assert _max_diameter(points) == pytest.approx(expected, rel=1e-12)


def test_a_crop_measures_like_the_whole_grid() -> None:
    """measure_labelmap works on each segment's bounding box; the numbers must not change."""
    shape, spacing = (40, 64, 64), (2.0, 0.9, 0.9)
    volume = _volume(shape, spacing, oblique_orientation())
    mask = ball(shape, spacing, 12.0)
    mask = np.roll(mask, (5, -9, 11), axis=(0, 1, 2))
    labels = mask.astype(np.uint8)
    (cropped,) = measure_labelmap(volume, Labelmap(labels, (LIVER,)))
    whole = measure_segment(volume, mask, LIVER, midline_x=cropped_midline(volume, labels))
    for name in ("max_diameter_mm", "surface_area_mm2", "sphericity"):  # mesh: float rounding
        assert getattr(cropped, name) == pytest.approx(getattr(whole, name), rel=1e-6)
        object.__setattr__(cropped, name, getattr(whole, name))
    assert cropped == whole


def cropped_midline(volume: Volume, labels: np.ndarray) -> float:
    """No body segment: the midline is the centre of the imaged field."""
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1) / 2
    return float(volume.index_to_patient(centre)[0])
