"""Per-segment numbers, computed once: what the SR, FHIR, overlay legend, PDF and dashboard show.

Definitions (each a documented choice, so two readers get the same number):

- Volume: voxel count times the voxel volume (|det| of the grid's affine, so oblique grids count
  right). Only for cross-sectional series with known spacing.
- Intensity: mean, population SD (ddof=0), min and max of the Volume's voxels inside the mask,
  blank filled slices excluded; Hounsfield units on CT, unitless otherwise.
- Centroid: mean of the voxel centres, in patient LPS mm. Its side is judged against a midline:
  the centroid of a ``body`` segment when the Labelmap has one, else the centre of the imaged
  field; within ``MIDLINE_MM`` of it is "midline". +x in LPS is the patient's left.
- Extents along L/R, A/P, S/I: the span of the voxel centres' patient coordinates plus one
  voxel's own span along that axis (so a 40 mm box measures 40 mm, not 40 mm less a voxel); the
  cranio-caudal "from-to" is the superior and inferior edge in patient z, with the slice range.
- Surface: marching cubes (scikit-image, level 0.5) on the mask lightly smoothed (Gaussian,
  ``SMOOTH_VOXELS``), which removes most of the staircase that inflates a binary mask's area;
  maximum 3D diameter is the largest distance between vertices of that mesh's convex hull
  (scipy.spatial), in patient mm.
- Sphericity: pi^(1/3) (6 V)^(2/3) / A with V the voxel volume and A the mesh area (1 for a ball).
- Connected components: 26-connectivity in 3D, 8 in 2D.
- 2D images (one slice): area in cm2 and width (along columns) / height (along rows) in mm, when
  the pixel spacing is known.

A value that cannot be computed (unknown spacing, too few voxels for a mesh) is ``None``, never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]
from scipy.spatial import ConvexHull, QhullError  # type: ignore[import-untyped,unused-ignore]
from skimage import measure as _skimage_measure  # type: ignore[import-untyped,unused-ignore]

from pacs_node.errors import ResultsError
from pacs_node.imaging.volume import Volume, VolumeKind
from pacs_node.inference.labelmap import Labelmap, SegmentSpec
from pacs_node.inference.vocabulary import CodedConcept
from pacs_node.results import codes

measure: Any = _skimage_measure  # untyped library: typed at this one seam

MIDLINE_MM = 10.0
SMOOTH_VOXELS = 0.7
_MIN_MESH_VOXELS = 8
_DIAMETER_CHUNK = 2048


class Side(StrEnum):
    """Which side of the patient a finding's centroid lies on."""

    LEFT = "left"
    RIGHT = "right"
    MIDLINE = "midline"


@dataclass(frozen=True, slots=True)
class Measurement:
    """One coded number: what SR content items, FHIR Observations and table rows are made of."""

    key: str  # stable within a Finding: "volume", "hu_mean", ...
    label: str  # short human label for tables and legends
    name: CodedConcept
    value: float
    unit: CodedConcept
    derivation: CodedConcept | None = None

    def formatted(self) -> str:
        """The value with its unit, rounded for reading (tables, legends)."""
        unit = {"[hnsf'U]": "HU", "1": ""}.get(self.unit.value, self.unit.value)
        digits = 0 if self.key == "components" else (3 if self.key == "sphericity" else 1)
        return f"{self.value:.{digits}f} {unit}".strip()


@dataclass(frozen=True, slots=True)
class IntensityStats:
    mean: float
    sd: float
    minimum: float
    maximum: float
    hounsfield: bool


@dataclass(frozen=True)
class Finding:
    """Everything measured on one segment; ``None`` where a value cannot be computed."""

    segment: SegmentSpec
    voxel_count: int
    volume_ml: float | None = None
    area_cm2: float | None = None
    intensity: IntensityStats | None = None
    centroid_lps: tuple[float, float, float] | None = None
    side: Side | None = None
    slice_range: tuple[int, int] | None = None  # 0-based first and last slice index
    craniocaudal_mm: tuple[float, float] | None = None  # superior edge, inferior edge (patient z)
    extent_lr_mm: float | None = None
    extent_ap_mm: float | None = None
    extent_si_mm: float | None = None
    width_mm: float | None = None  # 2D: along columns
    height_mm: float | None = None  # 2D: along rows
    max_diameter_mm: float | None = None
    surface_area_mm2: float | None = None
    sphericity: float | None = None
    components: int = 0

    @property
    def present(self) -> bool:
        return self.voxel_count > 0

    def measurements(self) -> tuple[Measurement, ...]:
        """The coded numbers, in the order every renderer shows them; absent values left out."""
        out: list[Measurement] = []

        def add(
            key: str,
            label: str,
            name: CodedConcept,
            value: float | None,
            unit: CodedConcept,
            derivation: CodedConcept | None = None,
        ) -> None:
            if value is not None and math.isfinite(value):
                out.append(Measurement(key, label, name, float(value), unit, derivation))

        add("volume", "Volume", codes.VOLUME, self.volume_ml, codes.MILLILITER)
        add("area", "Area", codes.AREA, self.area_cm2, codes.SQUARE_CENTIMETER)
        if self.intensity is not None:
            stats = self.intensity
            name = codes.ATTENUATION if stats.hounsfield else codes.IMAGE_INTENSITY
            unit = codes.HOUNSFIELD if stats.hounsfield else codes.NO_UNITS
            prefix = "HU" if stats.hounsfield else "Intensity"
            add("intensity_mean", f"{prefix} mean", name, stats.mean, unit, codes.MEAN)
            add("intensity_sd", f"{prefix} SD", name, stats.sd, unit, codes.STANDARD_DEVIATION)
            add("intensity_min", f"{prefix} min", name, stats.minimum, unit, codes.MINIMUM)
            add("intensity_max", f"{prefix} max", name, stats.maximum, unit, codes.MAXIMUM)
        add("extent_lr", "Extent L-R", codes.EXTENT_LR, self.extent_lr_mm, codes.MILLIMETER)
        add("extent_ap", "Extent A-P", codes.EXTENT_AP, self.extent_ap_mm, codes.MILLIMETER)
        add("extent_si", "Extent S-I", codes.EXTENT_SI, self.extent_si_mm, codes.MILLIMETER)
        add("width", "Width", codes.WIDTH, self.width_mm, codes.MILLIMETER)
        add("height", "Height", codes.HEIGHT, self.height_mm, codes.MILLIMETER)
        add(
            "max_diameter",
            "Max 3D diameter",
            codes.DIAMETER,
            self.max_diameter_mm,
            codes.MILLIMETER,
            codes.MAXIMUM,
        )
        add(
            "surface_area",
            "Surface area",
            codes.SURFACE_AREA,
            self.surface_area_mm2,
            codes.SQUARE_MILLIMETER,
        )
        add("sphericity", "Sphericity", codes.SPHERICITY, self.sphericity, codes.NO_UNITS)
        if self.present:
            add("components", "Components", codes.COMPONENT_COUNT, self.components, codes.NO_UNITS)
        return tuple(out)


def measure_labelmap(volume: Volume, labelmap: Labelmap) -> tuple[Finding, ...]:
    """One Finding per segment of the Labelmap, in segment order (absent ones with zero voxels)."""
    if labelmap.labels.shape != volume.voxels.shape:
        raise ResultsError(
            f"labelmap shape {labelmap.labels.shape} differs from the volume {volume.voxels.shape}"
        )
    midline_x = _midline_x(volume, labelmap)
    return tuple(
        measure_segment(volume, labelmap.mask(spec.value), spec, midline_x=midline_x)
        for spec in labelmap.segments
    )


def measure_segment(
    volume: Volume,
    mask: NDArray[np.bool_],
    spec: SegmentSpec,
    *,
    midline_x: float | None = None,
) -> Finding:
    """Measure one binary mask on the Volume's grid (see the module docstring for definitions)."""
    count = int(np.count_nonzero(mask))
    if count == 0:
        return Finding(segment=spec, voxel_count=0)
    planar = volume.kind is VolumeKind.IMAGE or volume.shape[0] == 1
    real_slices = np.ones(volume.shape[0], dtype=bool)
    if volume.filled_slices:
        real_slices[list(volume.filled_slices)] = False
    intensity = _intensity(volume, mask, real_slices)
    structure = np.ones((3, 3, 3), dtype=bool)
    if planar:
        structure[0] = structure[2] = False
    _, components = ndimage.label(mask, structure=structure)
    z_present = np.flatnonzero(mask.any(axis=(1, 2)))
    slice_range = (int(z_present[0]), int(z_present[-1]))
    if planar:
        return _planar_finding(volume, mask, spec, count, intensity, int(components), slice_range)
    if volume.kind is not VolumeKind.SERIES or not volume.spacing_known:
        return Finding(
            segment=spec,
            voxel_count=count,
            intensity=intensity,
            slice_range=slice_range,
            components=int(components),
        )
    affine = volume.affine_lps()
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    volume_mm3 = count * voxel_mm3
    indices = np.argwhere(mask)
    centroid = volume.index_to_patient(indices.mean(axis=0))
    boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask, structure=structure))
    points = volume.index_to_patient(boundary)
    half_voxel = 0.5 * np.abs(affine[:3, :3]).sum(axis=1)  # per LPS axis
    low = points.min(axis=0) - half_voxel
    high = points.max(axis=0) + half_voxel
    extents = high - low
    mesh = _mesh(volume, mask)
    area = diameter = sphericity = None
    if mesh is not None:
        verts, faces = mesh
        area = float(measure.mesh_surface_area(verts, faces))
        diameter = _max_diameter(verts)
        if area > 0:
            sphericity = math.pi ** (1 / 3) * (6 * volume_mm3) ** (2 / 3) / area
    side = None
    if midline_x is not None:
        offset = float(centroid[0]) - midline_x
        side = (
            Side.MIDLINE if abs(offset) <= MIDLINE_MM else (Side.LEFT if offset > 0 else Side.RIGHT)
        )
    return Finding(
        segment=spec,
        voxel_count=count,
        volume_ml=volume_mm3 / 1000.0,
        intensity=intensity,
        centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        side=side,
        slice_range=slice_range,
        craniocaudal_mm=(float(high[2]), float(low[2])),
        extent_lr_mm=float(extents[0]),
        extent_ap_mm=float(extents[1]),
        extent_si_mm=float(extents[2]),
        max_diameter_mm=diameter,
        surface_area_mm2=area,
        sphericity=sphericity,
        components=int(components),
    )


def _planar_finding(
    volume: Volume,
    mask: NDArray[np.bool_],
    spec: SegmentSpec,
    count: int,
    intensity: IntensityStats | None,
    components: int,
    slice_range: tuple[int, int],
) -> Finding:
    if not volume.spacing_known:
        return Finding(
            segment=spec,
            voxel_count=count,
            intensity=intensity,
            slice_range=slice_range,
            components=components,
        )
    _, dy, dx = volume.spacing
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    return Finding(
        segment=spec,
        voxel_count=count,
        area_cm2=count * dy * dx / 100.0,
        intensity=intensity,
        slice_range=slice_range,
        width_mm=float((cols[-1] - cols[0] + 1) * dx),
        height_mm=float((rows[-1] - rows[0] + 1) * dy),
        components=components,
    )


def _intensity(
    volume: Volume, mask: NDArray[np.bool_], real_slices: NDArray[np.bool_]
) -> IntensityStats | None:
    values = volume.voxels[real_slices][mask[real_slices]].astype(np.float64)
    if values.size == 0:
        return None
    hounsfield = volume.modality.upper() == "CT" and not volume.from_color
    return IntensityStats(
        mean=float(values.mean()),
        sd=float(values.std()),
        minimum=float(values.min()),
        maximum=float(values.max()),
        hounsfield=hounsfield,
    )


def _mesh(
    volume: Volume, mask: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.int64]] | None:
    """Marching-cubes surface of the mask in patient mm, cropped to its bounding box."""
    if np.count_nonzero(mask) < _MIN_MESH_VOXELS:
        return None
    pad = 3
    lo = np.argwhere(mask).min(axis=0)
    hi = np.argwhere(mask).max(axis=0) + 1
    crop = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], pad).astype(np.float32)
    smooth = ndimage.gaussian_filter(crop, SMOOTH_VOXELS)
    try:
        verts, faces, _, _ = measure.marching_cubes(smooth, level=0.5)
    except (ValueError, RuntimeError):
        return None
    indices = verts + (lo - pad)
    return volume.index_to_patient(indices), np.asarray(faces, dtype=np.int64)


def _max_diameter(points: NDArray[np.float64]) -> float | None:
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return None
    vertices = points[hull.vertices]
    best = 0.0
    for start in range(0, len(vertices), _DIAMETER_CHUNK):
        block = vertices[start : start + _DIAMETER_CHUNK]
        dist = np.linalg.norm(block[:, None, :] - vertices[None, :, :], axis=-1)
        best = max(best, float(dist.max()))
    return best


def _midline_x(volume: Volume, labelmap: Labelmap) -> float | None:
    """Patient x of the midline: the body segment's centroid, else the field's centre."""
    if volume.kind is not VolumeKind.SERIES:
        return None
    for spec in labelmap.segments:
        if spec.structure.name == "body":
            body = np.argwhere(labelmap.labels == spec.value)
            if body.size:
                return float(volume.index_to_patient(body.mean(axis=0))[0])
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1) / 2
    return float(volume.index_to_patient(centre)[0])
