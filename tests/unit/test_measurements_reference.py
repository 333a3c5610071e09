"""The measurements and the gate's input percentiles equal a plain reference implementation.

The node measures each label inside its bounding box with one-pass shortcuts (extents from row
ends, projections for the centroid, its own mesh area and affine map, the body's voxels picked
before they become float32); the reference below measures the obvious way, on whole-volume
masks and every voxel index. The SR, FHIR and PDF print these numbers, so they must agree to
floating-point rounding on awkward labelmaps: empty labels, one-voxel labels, labels cut by the
volume's faces, several pieces, anisotropic voxels, oblique grids, filled slices, CT and MR.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull, distance
from skimage import measure

from pacs_node.imaging import Volume, load_series
from pacs_node.inference.labelmap import Labelmap, SegmentSpec
from pacs_node.inference.vocabulary import structure
from pacs_node.quality.checks import input_percentiles
from pacs_node.results import measure_labelmap
from pacs_node.results.measurements import SMOOTH_VOXELS, Finding, laterality_of
from tests.results_factory import AXIAL, make_series, oblique_orientation

SHAPE = (24, 40, 48)
RTOL = 1e-9  # summation order only: anything larger is a changed number


def _labels(seed: int, with_body: bool) -> tuple[NDArray[np.uint8], tuple[SegmentSpec, ...]]:
    """Lumpy organs in several pieces, a block cut by two faces, one voxel, an empty label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.uint8)
    if with_body:
        labels[2:22, 4:36, 5:43] = 6
    field = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    blob = field > np.quantile(field, 0.85)
    labels[3:20, 8:30, 10:30][blob[3:20, 8:30, 10:30]] = 1  # liver: several pieces
    labels[0:6, 10:20, 40:48] = 2  # kidney_left: cut by the first slice and the last column
    labels[12, 20, 24] = 3  # spine: one voxel
    labels[8:16, 30:38, 6:12] = 5  # lung: both sides of the field
    labels[8:16, 30:38, 36:42] = 5
    labels[10, 31:37, 2] = 5  # a one-voxel-thick sliver far to one side
    specs = [
        SegmentSpec(1, structure("liver")),
        SegmentSpec(2, structure("kidney_left")),
        SegmentSpec(3, structure("spine")),
        SegmentSpec(4, structure("aorta")),  # never drawn: zero voxels
        SegmentSpec(5, structure("lung")),
    ]
    if with_body:
        specs.insert(0, SegmentSpec(6, structure("body")))
    return labels, tuple(specs)


def _volume(
    seed: int,
    spacing: tuple[float, float, float],
    orientation: tuple[float, ...],
    modality: str,
    filled: tuple[int, ...],
) -> Volume:
    stored = np.random.default_rng(seed + 100).integers(-300, 400, SHAPE).astype(np.int16)
    volume = load_series(
        make_series(stored, spacing=spacing, orientation=orientation, modality=modality)
    )
    return dataclasses.replace(volume, filled_slices=filled) if filled else volume


def _reference(volume: Volume, labelmap: Labelmap) -> list[dict[str, Any] | None]:
    """Each segment measured on its whole-volume mask, from every voxel index."""
    labels = labelmap.labels
    affine = volume.affine_lps()
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    half = 0.5 * np.abs(affine[:3, :3]).sum(axis=1)
    real = np.ones(volume.shape[0], bool)
    real[list(volume.filled_slices)] = False
    body = [s.value for s in labelmap.segments if s.structure.name == "body"]
    if body and (labels == body[0]).any():
        midline = float(volume.index_to_patient(np.argwhere(labels == body[0]).mean(axis=0))[0])
    else:
        midline = float(volume.index_to_patient((np.asarray(SHAPE, float) - 1) / 2)[0])
    out: list[dict[str, Any] | None] = []
    for spec in labelmap.segments:
        mask = labels == spec.value
        index = np.argwhere(mask)
        if not len(index):
            out.append(None)
            continue
        values = volume.voxels[mask & real[:, None, None]].astype(np.float64)
        points = volume.index_to_patient(index)
        low, high = points.min(axis=0) - half, points.max(axis=0) + half
        centroid = volume.index_to_patient(index.mean(axis=0))
        _, components = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        first, last = index.min(axis=0), index.max(axis=0)
        area = diameter = None
        if len(index) >= 8:
            crop = mask[tuple(slice(a, b + 1) for a, b in zip(first, last, strict=True))]
            smooth = ndimage.gaussian_filter(np.pad(crop, 3).astype(np.float32), SMOOTH_VOXELS)
            verts, faces, _, _ = measure.marching_cubes(smooth, level=0.5)
            verts = volume.index_to_patient(verts + (first - 3))
            area = float(measure.mesh_surface_area(verts, faces))
            hull = verts[ConvexHull(verts).vertices]
            diameter = float(distance.pdist(hull).max())
        reach = (float(points[:, 0].min()) - midline, float(points[:, 0].max()) - midline)
        out.append(
            {
                "voxel_count": len(index),
                "volume_ml": len(index) * voxel_mm3 / 1000,
                "intensity": (values.mean(), values.std(), values.min(), values.max()),
                "centroid_lps": tuple(centroid),
                "midline_offset_mm": float(centroid[0]) - midline,
                "laterality": laterality_of(spec, reach),
                "index_box": tuple((int(a), int(b)) for a, b in zip(first, last, strict=True)),
                "craniocaudal_mm": (high[2], low[2]),
                "extents": tuple(high - low),
                "components": components,
                "surface_area_mm2": area,
                "max_diameter_mm": diameter,
                "sphericity": None
                if area is None
                else math.pi ** (1 / 3) * (6 * len(index) * voxel_mm3) ** (2 / 3) / area,
            }
        )
    return out


def _same(found: Finding, expected: dict[str, Any] | None) -> None:
    if expected is None:
        assert found.voxel_count == 0
        assert not found.present
        return
    name = found.segment.structure.name
    assert found.voxel_count == expected["voxel_count"], name
    assert found.components == expected["components"], name
    assert found.index_box == expected["index_box"], name
    assert found.slice_range == expected["index_box"][0], name
    assert found.laterality == expected["laterality"], name
    stats = found.intensity
    assert stats is not None
    got = (stats.mean, stats.sd, stats.minimum, stats.maximum)
    assert got == pytest.approx(expected["intensity"], rel=RTOL, abs=1e-9), name
    assert found.volume_ml == pytest.approx(expected["volume_ml"], rel=RTOL), name
    assert found.centroid_lps == pytest.approx(expected["centroid_lps"], rel=RTOL, abs=1e-9)
    assert found.midline_offset_mm == pytest.approx(
        expected["midline_offset_mm"], rel=RTOL, abs=1e-9
    )
    extents = (found.extent_lr_mm, found.extent_ap_mm, found.extent_si_mm)
    assert extents == pytest.approx(expected["extents"], rel=RTOL), name
    assert found.craniocaudal_mm == pytest.approx(expected["craniocaudal_mm"], rel=RTOL, abs=1e-9)
    for key in ("surface_area_mm2", "max_diameter_mm", "sphericity"):
        if expected[key] is None:
            assert getattr(found, key) is None, (name, key)
        else:
            assert getattr(found, key) == pytest.approx(expected[key], rel=RTOL), (name, key)


CASES = [
    ((1.0, 1.0, 1.0), AXIAL, "CT", True, ()),
    ((2.5, 0.7, 0.9), AXIAL, "CT", False, ()),
    ((1.5, 0.8, 0.8), oblique_orientation(), "CT", True, (5,)),
    ((3.0, 1.2, 0.6), oblique_orientation(40.0), "MR", True, ()),
]


@pytest.mark.parametrize(("spacing", "orientation", "modality", "with_body", "filled"), CASES)
@pytest.mark.parametrize("seed", [3, 11])
def test_measurements_equal_the_reference(
    seed: int,
    spacing: tuple[float, float, float],
    orientation: tuple[float, ...],
    modality: str,
    with_body: bool,
    filled: tuple[int, ...],
) -> None:
    volume = _volume(seed, spacing, orientation, modality, filled)
    labels, specs = _labels(seed, with_body)
    labelmap = Labelmap(labels, specs)
    findings = measure_labelmap(volume, labelmap)
    expected = _reference(volume, labelmap)
    assert [f.segment for f in findings] == list(specs)
    for found, wanted in zip(findings, expected, strict=True):
        _same(found, wanted)
    # the cases must reach what they are meant to: an empty label, one voxel, several pieces,
    # a label cut by the volume's faces, a paired label reaching both sides
    by_name = {f.segment.structure.name: f for f in findings}
    assert not by_name["aorta"].present
    assert by_name["spine"].voxel_count == 1
    assert by_name["spine"].surface_area_mm2 is None
    assert by_name["liver"].components > 1
    assert by_name["lung"].components == 3
    assert by_name["kidney_left"].index_box == ((0, 5), (10, 19), (40, 47))


def _reference_percentiles(
    volume: Volume, labelmap: Labelmap | None, percentiles: list[float]
) -> list[float]:
    """The gate's input percentiles, computed on a float32 copy of the whole volume."""
    voxels = np.asarray(volume.voxels, dtype=np.float32)
    inside = voxels
    if labelmap is not None:
        body = [s.value for s in labelmap.segments if s.name == "body"]
        if body and (labelmap.labels == body[0]).any():
            inside = voxels[labelmap.labels == body[0]]
    if volume.modality.upper() != "CT":
        low, high = np.percentile(voxels, [1.0, 99.0])
        inside = (inside - low) / max(float(high - low), 1e-6)
    return [float(v) for v in np.nanpercentile(inside, percentiles)]


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("labels", ["body", "no body", "empty body", "none"])
def test_input_percentiles_equal_the_reference(modality: str, labels: str) -> None:
    volume = _volume(5, (2.0, 0.9, 0.9), AXIAL, modality, ())
    drawn, specs = _labels(5, with_body=labels != "no body")
    if labels == "empty body":
        drawn[drawn == 6] = 0
    labelmap = None if labels == "none" else Labelmap(drawn, specs)
    percentiles = [1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0]
    got = input_percentiles(volume, labelmap, percentiles)
    assert got == _reference_percentiles(volume, labelmap, percentiles)
    if labels == "body":  # the body's voxels, not the whole image's
        assert got != _reference_percentiles(volume, None, percentiles)
