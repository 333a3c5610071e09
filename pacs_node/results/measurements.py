"""Per-segment numbers, computed once: what the SR, FHIR, overlay legend, PDF and dashboard show.

Definitions (each a documented choice, so two readers get the same number):

- Volume: voxel count times the voxel volume (|det| of the grid's affine, so oblique grids count
  right). Only for cross-sectional series with known spacing.
- Intensity: mean, population SD (ddof=0), min and max of the Volume's voxels inside the mask,
  blank filled slices excluded; Hounsfield units on CT, unitless otherwise.
- Centroid: mean of the voxel centres, in patient LPS mm. Its offset from a midline is kept:
  the midline is the centroid of a ``body`` segment when the Labelmap has one, else the centre
  of the imaged field; within ``MIDLINE_MM`` (10 mm) of it is "midline". +x in LPS is the
  patient's left.
- Laterality (PS3.16 CID 244), only for paired structures (``Structure.paired``): a lateralised
  structure (``lung_left``) has its own; a paired structure without a side in its name
  (``lung``) is "bilateral" when its voxel centres reach beyond ``MIDLINE_MM`` on both sides of
  the midline, else the side they reach beyond it on (none when it lies wholly within it);
  unpaired structures (spine, heart, body, ...) have none. The centroid is a consistency check:
  a lateralised structure whose centroid lies beyond ``MIDLINE_MM`` on the other side (a
  left/right swap by the model, a wrong orientation) is flagged (``side_conflict``), never
  silently printed, and every renderer shows the warning.
- Sides on 2D images (radiographs, ultrasound): never from the image's own left/right, which
  depends on how the image was stored. Patient Orientation (0020,0020, PS3.3 C.7.6.1.1.1) names
  the patient direction along which the column index (first value) and the row index (second
  value) increase; the axis whose direction starts with L or R is the left-right one. The
  centroid's side is taken against the image centre on that axis (within ``MIDLINE_MM``, or 3 %
  of the axis when the pixel spacing is unknown, is "midline"). Without Patient Orientation, or
  when neither axis is left-right (a lateral view), the side cannot be checked and a lateralised
  structure says so (``side_unchecked``) instead of passing silently.
- Extents along L/R, A/P, S/I: the span of the voxel centres' patient coordinates plus one
  voxel's own span along that axis (so a 40 mm box measures 40 mm, not 40 mm less a voxel); the
  cranio-caudal "from-to" is the superior and inferior edge in patient z, with the slice range.
- Surface: marching cubes (scikit-image, level 0.5) on the mask lightly smoothed (Gaussian,
  ``SMOOTH_VOXELS``), which removes most of the staircase that inflates a binary mask's area;
  maximum 3D diameter is the largest distance between vertices of that mesh's convex hull
  (scipy.spatial), in patient mm.
- Sphericity: pi^(1/3) (6 V)^(2/3) / A with V the voxel volume and A the mesh area (1 for a ball).
- Connected components: 26-connectivity in 3D, 8 in 2D. A structure that is one piece in a
  patient (``Structure.one_piece``) found in several is reported so (``fragmented``).
- 2D images (one slice): area in cm2 and width (along columns) / height (along rows) in mm, when
  the pixel spacing is known (see :mod:`pacs_node.imaging.volume`: Pixel Spacing above 0, else
  Imager Pixel Spacing corrected by the Estimated Radiographic Magnification Factor when given;
  ``size_basis`` says which, for the report).
- Unknown spacing (a radiograph with Pixel Spacing 0 and no Imager Pixel Spacing, ultrasound
  without calibrated regions, a series without Pixel Spacing): the sizes are "not measurable"
  (``not_measurable``, :meth:`Finding.unmeasured`): the SR leaves them out, the PDF, key-image
  legend and FHIR say so (FHIR: no valueQuantity, a dataAbsentReason). Pixels are never taken
  as 1 mm.

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
from scipy.spatial import (  # type: ignore[import-untyped,unused-ignore]
    ConvexHull,
    QhullError,
    distance,
)
from skimage import measure as _skimage_measure  # type: ignore[import-untyped,unused-ignore]

from pacs_node.errors import ResultsError
from pacs_node.imaging.volume import Volume, VolumeKind
from pacs_node.inference.labelmap import Labelmap, SegmentSpec
from pacs_node.inference.vocabulary import CodedConcept, Laterality
from pacs_node.results import codes

measure: Any = _skimage_measure  # untyped library: typed at this one seam

MIDLINE_MM = 10.0
MIDLINE_FRACTION = 0.03  # 2D images of unknown pixel spacing: the midline band, per image axis
SMOOTH_VOXELS = 0.7
_MIN_MESH_VOXELS = 8
_DIAMETER_CHUNK = 2048


class Side(StrEnum):
    """Which side of the midline a finding's centroid lies on (not a laterality: see
    :attr:`Finding.laterality`)."""

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


NOT_MEASURABLE = "not measurable: the image gives no pixel spacing"


@dataclass(frozen=True, slots=True)
class Unmeasured:
    """A size the image does not allow (unknown pixel spacing): named, never given a value."""

    key: str
    label: str
    name: CodedConcept
    unit: CodedConcept
    reason: str = NOT_MEASURABLE


_SIZES = {
    "volume": ("Volume", codes.VOLUME, codes.MILLILITER),
    "area": ("Area", codes.AREA, codes.SQUARE_CENTIMETER),
    "width": ("Width", codes.WIDTH, codes.MILLIMETER),
    "height": ("Height", codes.HEIGHT, codes.MILLIMETER),
}


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
    midline_offset_mm: float | None = None  # centroid x minus the midline's (+: patient left)
    image_side: Side | None = None  # 2D: the centroid's side from Patient Orientation
    side_unchecked: str | None = None  # 2D, lateralised structure: why its side cannot be checked
    laterality: Laterality | None = None
    slice_range: tuple[int, int] | None = None  # 0-based first and last slice index
    # 0-based first and last array index along z, y and x (the label's tight bounding box)
    index_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
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
    not_measurable: tuple[str, ...] = ()  # size keys the unknown pixel spacing rules out
    size_basis: str = ""  # where the pixel spacing behind the sizes came from (2D images)

    def unmeasured(self) -> tuple[Unmeasured, ...]:
        """The sizes this finding cannot have, in the order :meth:`measurements` would give."""
        if not self.present:
            return ()
        return tuple(Unmeasured(key, *_SIZES[key]) for key in self.not_measurable)

    def size_text(self) -> str:
        """The headline size as legends and conclusions show it: the volume or area, "not
        measurable" when the spacing rules it out, else empty."""
        size = next((m.formatted() for m in self.measurements() if m.key in ("volume", "area")), "")
        if size or not self.unmeasured():
            return size
        return f"{self.unmeasured()[0].label.lower()} not measurable (no pixel spacing)"

    @property
    def present(self) -> bool:
        return self.voxel_count > 0

    @property
    def centroid_side(self) -> Side | None:
        if self.image_side is not None:
            return self.image_side
        if self.midline_offset_mm is None:
            return None
        if abs(self.midline_offset_mm) <= MIDLINE_MM:
            return Side.MIDLINE
        return Side.LEFT if self.midline_offset_mm > 0 else Side.RIGHT

    @property
    def side_conflict(self) -> bool:
        """A lateralised structure whose centroid lies beyond the tolerance on the other side."""
        own = self.segment.structure.laterality
        side = self.centroid_side
        if own is None or own is Laterality.BILATERAL or side is None or side is Side.MIDLINE:
            return False
        return side.value != own.value

    @property
    def fragmented(self) -> bool:
        """A structure that is one piece in a patient, found in several."""
        return self.segment.structure.one_piece and self.components > 1

    @property
    def label(self) -> str:
        """The name every renderer shows: the structure's, with its laterality where the name
        does not already start with it ("Lungs (bilateral)", "Left lung", "Spine")."""
        display = self.segment.structure.display
        if self.laterality is None or display.lower().startswith(self.laterality.value):
            return display
        return f"{display} ({self.laterality.value})"

    def warnings(self) -> tuple[str, ...]:
        """What a reader must know before trusting this finding, one sentence each."""
        out: list[str] = []
        side = self.centroid_side.value if self.centroid_side else ""
        if self.side_conflict and self.image_side is not None:
            distance = (
                f", {abs(self.midline_offset_mm):.0f} mm from its centre"
                if self.midline_offset_mm is not None
                else ""
            )
            out.append(
                f"{self.label}: its centre lies on the patient's {side} half of the image (by "
                f"Patient Orientation{distance}); check for a left/right swap or a wrong image "
                "orientation"
            )
        elif self.side_conflict and self.midline_offset_mm is not None:
            out.append(
                f"{self.label}: its centre lies {abs(self.midline_offset_mm):.0f} mm to the "
                f"patient's {side} of the midline; check for a left/right swap or a wrong "
                "image orientation"
            )
        if self.side_unchecked:
            out.append(f"{self.label}: its side cannot be checked ({self.side_unchecked})")
        if self.fragmented:
            out.append(
                f"{self.label}: in {self.components} separate parts where one is expected; "
                "read its numbers with care"
            )
        return tuple(out)

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
    """One Finding per segment of the Labelmap, in segment order (absent ones with zero voxels).

    Each segment is measured inside its own bounding box (one ``find_objects`` pass over the
    labels), so a small organ costs what its box costs, not what the whole volume costs."""
    if labelmap.labels.shape != volume.voxels.shape:
        raise ResultsError(
            f"labelmap shape {labelmap.labels.shape} differs from the volume {volume.voxels.shape}"
        )
    boxes = segment_boxes(labelmap)
    midline_x = _midline_x(volume, labelmap, boxes)
    findings = []
    for spec in labelmap.segments:
        box = boxes.get(spec.value)
        if box is None:
            findings.append(Finding(segment=spec, voxel_count=0))
            continue
        crop = np.asarray(labelmap.labels[box] == spec.value)
        findings.append(
            measure_segment(volume, crop, spec, midline_x=midline_x, offset=_box_start(box))
        )
    return tuple(findings)


Box = tuple[slice, slice, slice]


def segment_boxes(labelmap: Labelmap) -> dict[int, Box]:
    """The bounding box (array slices) of every label value present in the Labelmap."""
    values = [spec.value for spec in labelmap.segments if spec.value > 0]
    if not values:
        return {}
    found = ndimage.find_objects(labelmap.labels, max_label=max(values))
    return {v: found[v - 1] for v in values if found[v - 1] is not None}


def _box_start(box: Box) -> tuple[int, int, int]:
    return (int(box[0].start), int(box[1].start), int(box[2].start))


def measure_segment(
    volume: Volume,
    mask: NDArray[np.bool_],
    spec: SegmentSpec,
    *,
    midline_x: float | None = None,
    offset: tuple[int, int, int] = (0, 0, 0),
) -> Finding:
    """Measure one binary mask on the Volume's grid (see the module docstring for definitions).

    ``mask`` may be a crop of the Volume's grid whose first voxel sits at index ``offset``."""
    counts = _projections(mask)
    count = int(counts[0].sum())
    if count == 0:
        return Finding(segment=spec, voxel_count=0)
    start = np.asarray(offset, dtype=np.int64)
    stop = start + np.asarray(mask.shape, dtype=np.int64)
    box = (
        slice(int(start[0]), int(stop[0])),
        slice(int(start[1]), int(stop[1])),
        slice(int(start[2]), int(stop[2])),
    )
    planar = volume.kind is VolumeKind.IMAGE or volume.shape[0] == 1
    real_slices = np.ones(volume.shape[0], dtype=bool)
    if volume.filled_slices:
        real_slices[list(volume.filled_slices)] = False
    intensity = _intensity(volume.voxels[box], mask, real_slices[box[0]], volume)
    structure = np.ones((3, 3, 3), dtype=bool)
    if planar:
        structure[0] = structure[2] = False
    _, components = ndimage.label(mask, structure=structure)
    index_box = _index_box(counts, start)
    slice_range = index_box[0]
    if planar:
        return _planar_finding(
            volume, mask, spec, count, intensity, int(components), index_box, start
        )
    if volume.kind is not VolumeKind.SERIES or not volume.spacing_known:
        return Finding(
            segment=spec,
            voxel_count=count,
            intensity=intensity,
            slice_range=slice_range,
            index_box=index_box,
            components=int(components),
            laterality=laterality_of(spec, None),
            not_measurable=("volume",) if volume.kind is VolumeKind.SERIES else (),
        )
    affine = volume.affine_lps()
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    volume_mm3 = count * voxel_mm3
    centroid = volume.index_to_patient(_mean_of(counts) + start)
    points = volume.index_to_patient(_row_ends(mask) + start)
    half_voxel = 0.5 * np.abs(affine[:3, :3]).sum(axis=1)  # per LPS axis
    low = points.min(axis=0) - half_voxel
    high = points.max(axis=0) + half_voxel
    extents = high - low
    mesh = _mesh(volume, mask, start, count)
    area = diameter = sphericity = None
    if mesh is not None:
        verts, faces = mesh
        area = _mesh_area(verts, faces)
        diameter = _max_diameter(verts)
        if area > 0:
            sphericity = math.pi ** (1 / 3) * (6 * volume_mm3) ** (2 / 3) / area
    midline_offset = None if midline_x is None else float(centroid[0]) - midline_x
    reach = None
    if midline_x is not None:
        reach = (float(points[:, 0].min()) - midline_x, float(points[:, 0].max()) - midline_x)
    return Finding(
        segment=spec,
        voxel_count=count,
        volume_ml=volume_mm3 / 1000.0,
        intensity=intensity,
        centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        midline_offset_mm=midline_offset,
        laterality=laterality_of(spec, reach),
        slice_range=slice_range,
        index_box=index_box,
        craniocaudal_mm=(float(high[2]), float(low[2])),
        extent_lr_mm=float(extents[0]),
        extent_ap_mm=float(extents[1]),
        extent_si_mm=float(extents[2]),
        max_diameter_mm=diameter,
        surface_area_mm2=area,
        sphericity=sphericity,
        components=int(components),
    )


Projections = tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]


def _projections(mask: NDArray[np.bool_]) -> Projections:
    """A 3D mask's voxel counts per z, per y and per x index, from two passes over it: the
    voxel count, bounding box and centroid all follow from these."""
    rows = np.count_nonzero(mask, axis=2)  # per (z, y)
    return rows.sum(axis=1), rows.sum(axis=0), np.count_nonzero(mask, axis=(0, 1))


def _index_box(
    counts: Projections, start: NDArray[np.int64]
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """First and last index of a non-empty mask along z, y and x (from its projections), on the
    Volume's grid."""
    spans = []
    for axis in range(3):
        present = np.flatnonzero(counts[axis]) + start[axis]
        spans.append((int(present[0]), int(present[-1])))
    return spans[0], spans[1], spans[2]


def _row_ends(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    """(z, y, x) indices of the first and last voxel of every row (along x) of a non-empty mask.

    A linear map (index to patient mm) takes its extremes over the mask at these voxels: along a
    row it is linear in x, so the row's ends bound every voxel between them. One pass over the
    mask, where a boundary by erosion took a filter pass and a much longer index list."""
    z, y = np.nonzero(mask.any(axis=2))
    first = mask.argmax(axis=2)[z, y]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)[z, y]
    zy = np.concatenate([z, z]), np.concatenate([y, y])
    return np.stack([*zy, np.concatenate([first, last])], axis=1).astype(np.int64)


def laterality_of(spec: SegmentSpec, reach: tuple[float, float] | None) -> Laterality | None:
    """A paired structure's laterality: its own when its name has a side, else from how far its
    voxel centres ``reach`` to the patient's right (negative) and left of the midline, in mm;
    ``None`` for unpaired structures and when the reach is unknown (2D, no geometry)."""
    structure = spec.structure
    if not structure.paired:
        return None
    if structure.laterality is not None:
        return structure.laterality
    if reach is None:
        return None
    right, left = reach[0] < -MIDLINE_MM, reach[1] > MIDLINE_MM
    if right and left:
        return Laterality.BILATERAL
    if left or right:
        return Laterality.LEFT if left else Laterality.RIGHT
    return None


def _mean_index(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Mean (z, y, x) index of a mask's voxels, from its three projections (no index list)."""
    return _mean_of(_projections(mask))


def _mean_of(counts: Projections) -> NDArray[np.float64]:
    """Mean (z, y, x) index of a non-empty mask's voxels from its projections."""
    total = float(counts[0].sum())
    means = []
    for per_index in counts:
        weights = per_index.astype(np.float64)
        means.append(float(weights @ np.arange(weights.size, dtype=np.float64)) / total)
    return np.asarray(means, dtype=np.float64)


def left_right_axis(volume: Volume) -> tuple[int, int] | str:
    """The array axis of a 2D image that runs left-right in the patient, and +1 when its index
    increases toward the patient's left (-1: right), from Patient Orientation; else why not."""
    header = volume.headers[0] if volume.headers else None
    values = (
        [] if header is None else [str(v).upper() for v in header.get("PatientOrientation") or []]
    )
    if len(values) != 2 or not all(values):
        view = "" if header is None else str(header.get("ViewPosition", "") or "").upper()
        if view in ("LL", "RL", "LLO", "RLO"):
            return f"a {view} view without Patient Orientation"
        return "the image carries no Patient Orientation"
    for axis, direction in ((2, values[0]), (1, values[1])):
        if direction[0] in "LR":
            return axis, 1 if direction[0] == "L" else -1
    return f"Patient Orientation {values[0]}\\{values[1]} has no left-right axis"


def _image_side(
    volume: Volume, mask: NDArray[np.bool_], spec: SegmentSpec, offset: NDArray[np.int64]
) -> tuple[Side | None, float | None, str | None]:
    """A 2D finding's side by Patient Orientation, its offset (mm, when the spacing is known)
    from the image centre, and why the side of a lateralised structure cannot be checked."""
    axis_sign = left_right_axis(volume)
    if isinstance(axis_sign, str):
        lateralised = spec.structure.laterality in (Laterality.LEFT, Laterality.RIGHT)
        return None, None, axis_sign if lateralised else None
    axis, sign = axis_sign
    size = volume.shape[axis]
    pixels = (float(_mean_index(mask)[axis] + offset[axis]) - (size - 1) / 2) * sign
    if volume.spacing_known:
        offset_mm = pixels * volume.spacing[axis]
        side = Side.MIDLINE if abs(offset_mm) <= MIDLINE_MM else None
        return side or (Side.LEFT if offset_mm > 0 else Side.RIGHT), offset_mm, None
    if abs(pixels) <= MIDLINE_FRACTION * size:
        return Side.MIDLINE, None, None
    return (Side.LEFT if pixels > 0 else Side.RIGHT), None, None


def _planar_finding(
    volume: Volume,
    mask: NDArray[np.bool_],
    spec: SegmentSpec,
    count: int,
    intensity: IntensityStats | None,
    components: int,
    index_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]],
    offset: NDArray[np.int64],
) -> Finding:
    side, offset_mm, unchecked = _image_side(volume, mask, spec, offset)
    slice_range = index_box[0]
    if not volume.spacing_known:
        return Finding(
            segment=spec,
            voxel_count=count,
            intensity=intensity,
            image_side=side,
            side_unchecked=unchecked,
            slice_range=slice_range,
            index_box=index_box,
            components=components,
            laterality=laterality_of(spec, None),
            not_measurable=("area", "width", "height"),
        )
    _, dy, dx = volume.spacing
    _, rows, cols = index_box
    return Finding(
        segment=spec,
        voxel_count=count,
        area_cm2=count * dy * dx / 100.0,
        intensity=intensity,
        midline_offset_mm=offset_mm,
        image_side=side,
        side_unchecked=unchecked,
        slice_range=slice_range,
        index_box=index_box,
        width_mm=float((cols[1] - cols[0] + 1) * dx),
        height_mm=float((rows[1] - rows[0] + 1) * dy),
        components=components,
        laterality=laterality_of(spec, None),
        size_basis=volume.spacing_source,
    )


def _intensity(
    voxels: NDArray[Any], mask: NDArray[np.bool_], real_slices: NDArray[np.bool_], volume: Volume
) -> IntensityStats | None:
    # no filled slice in the box: no copy of the box's voxels
    real = real_slices.all()
    picked = voxels[mask] if real else voxels[real_slices][mask[real_slices]]
    if picked.size == 0:
        return None
    values = picked.astype(np.float64)
    mean = values.mean()
    hounsfield = volume.modality.upper() == "CT" and not volume.from_color
    return IntensityStats(
        mean=float(mean),
        sd=float(np.sqrt(np.mean(np.square(values - mean)))),  # ndarray.std(), its mean once
        minimum=float(picked.min()),  # the stored values: their float64 is exact
        maximum=float(picked.max()),
        hounsfield=hounsfield,
    )


def _mesh(
    volume: Volume, mask: NDArray[np.bool_], start: NDArray[np.int64], count: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]] | None:
    """Marching-cubes surface of the mask (a crop whose first voxel is ``start``), in patient
    mm."""
    if count < _MIN_MESH_VOXELS:
        return None
    pad = 3
    crop = np.pad(mask, pad).view(np.uint8)  # 0/1: the filter's float32 output is the same
    smooth = ndimage.gaussian_filter(crop, SMOOTH_VOXELS, output=np.float32)
    try:
        verts, faces, _, _ = measure.marching_cubes(smooth, level=0.5)
    except (ValueError, RuntimeError):
        return None
    indices = verts + (start - pad)
    return _to_patient(volume, indices), np.asarray(faces, dtype=np.int64)


def _to_patient(volume: Volume, zyx: NDArray[np.float64]) -> NDArray[np.float64]:
    """Patient LPS mm of many (z, y, x) indices, as :meth:`Volume.index_to_patient` gives them
    (to rounding), with three broadcast products instead of a BLAS call: on a busy machine the
    library's worker threads can cost a mesh's worth of time for this 3 x 3 map."""
    affine = volume.affine_lps()
    out = zyx[:, 0:1] * affine[:3, 0] + zyx[:, 1:2] * affine[:3, 1]
    out += zyx[:, 2:3] * affine[:3, 2]
    out += affine[:3, 3]
    return out


def _mesh_area(verts: NDArray[np.float64], faces: NDArray[np.int64]) -> float:
    """Sum of the triangles' areas: scikit-image's ``mesh_surface_area``, term for term (the
    same products and sums in the same order), without its (n, 3, 3) copy and ``np.cross``."""
    first = verts[faces[:, 0]]
    a = first - verts[faces[:, 1]]
    b = first - verts[faces[:, 2]]
    del first
    cx = a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1]
    cy = a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2]
    cz = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return float(np.sqrt(cx * cx + cy * cy + cz * cz).sum() / 2.0)


def _max_diameter(points: NDArray[np.float64]) -> float | None:
    """Largest distance between two points: on the convex hull's vertices, exactly.

    A lower bound ``D`` from a few farthest-point hops prunes every vertex ``p`` with
    ``|p - c| + R < D`` (c the vertices' mean, R the largest ``|q - c|``): no pair through such a
    vertex can reach ``D``, so the brute-force search runs on the few vertices left."""
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return None
    vertices = points[hull.vertices]
    centre = vertices.mean(axis=0)
    radius = np.linalg.norm(vertices - centre, axis=1)
    best, start = 0.0, int(np.argmax(radius))
    for _ in range(3):
        reach = np.linalg.norm(vertices - vertices[start], axis=1)
        far = int(np.argmax(reach))
        best = max(best, float(reach[far]))
        start = far
    candidates = vertices[radius + radius.max() >= best]
    for first in range(0, len(candidates), _DIAMETER_CHUNK):
        block = candidates[first : first + _DIAMETER_CHUNK]
        best = max(best, float(distance.cdist(block, candidates).max()))
    return best


def _midline_x(volume: Volume, labelmap: Labelmap, boxes: dict[int, Box]) -> float | None:
    """Patient x of the midline: the body segment's centroid, else the field's centre."""
    if volume.kind is not VolumeKind.SERIES:
        return None
    for spec in labelmap.segments:
        box = boxes.get(spec.value)
        if spec.structure.name == "body" and box is not None:
            body = np.asarray(labelmap.labels[box] == spec.value)
            mean = _mean_index(body) + np.asarray(_box_start(box), dtype=np.float64)
            return float(volume.index_to_patient(mean)[0])
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1) / 2
    return float(volume.index_to_patient(centre)[0])
