"""A DICOM series becomes one :class:`Volume`: voxels plus exact patient geometry.

Geometry convention (used by every consumer, so stated once here):

- ``voxels`` is indexed ``[z, y, x]``: ``x`` is the DICOM column index, ``y`` the row index, ``z``
  the slice index.
- ``spacing`` is ``(dz, dy, dx)`` in mm: ``dy`` is PixelSpacing[0] (between rows), ``dx`` is
  PixelSpacing[1] (between columns), ``dz`` the distance between consecutive slice positions.
- ``direction`` is a 3x3 matrix whose *columns* are the patient LPS unit vectors along which the
  ``x``, ``y`` and ``z`` indices increase: column 0 is ImageOrientationPatient[0:3], column 1 is
  ImageOrientationPatient[3:6], column 2 is their cross product (the slice normal). Slices are
  sorted so that ``z`` increases along that normal, so ``direction`` is a proper rotation.
- ``origin`` is the LPS position in mm of the centre of voxel ``[0, 0, 0]`` (the
  ImagePositionPatient of the first sorted slice).
- :meth:`Volume.affine_lps` maps homogeneous *array-order* indices ``(z, y, x, 1)`` to LPS mm;
  :meth:`Volume.affine_ras` is the same in RAS, for NIfTI written from ``voxels`` as it is.

Decisions on what a series may hold (each refusal raises :class:`VolumeError` with the reason):

- Slices are sorted by the projection of ImagePositionPatient on the slice normal, never by
  InstanceNumber.
- Images typed LOCALIZER, and small groups (at most 3 images) whose orientation, matrix or pixel
  spacing differ from the majority, are dropped and recorded in :attr:`Volume.dropped`. Larger
  mixtures are refused as mixed orientations.
- Gantry tilt (slice positions that move in-plane from slice to slice) is refused, not resampled:
  a resampled grid would no longer match the source slices that DICOM-SEG frames must reference.
- Gaps larger than ``max_gap_ratio`` times the median spacing are refused unless ``fill_gaps``,
  which inserts blank slices (filled with the volume's minimum, listed in ``filled_slices``, with
  an empty SOP Instance UID) when each gap is a whole number of slices. Uneven spacing that no
  regular grid can hold is always refused.
- Several acquisitions (AcquisitionNumber) whose slices share positions are refused: choosing one
  would silently drop a contrast phase. Acquisitions at distinct positions are merged.
- Duplicate positions within one acquisition keep the lowest InstanceNumber; the others are
  dropped and recorded. When most positions repeat, the series is a dynamic / multi-phase one and
  is refused.
- Rescale slope/intercept is applied; voxels are int16 when slope and intercept are integers and
  the stored range fits, float32 otherwise.
- MONOCHROME1 is inverted so that higher values are always brighter (``inverted`` records it:
  ``original = lo + hi - voxel`` for the rescaled stored range ``lo..hi``).
- Colour images (RGB, YBR_*, PALETTE COLOR) become luminance (ITU-R BT.601 weights, the Y of
  YBR_FULL) in float32, so every Volume is 3D and every model, resampler and measurement sees one
  channel; ``from_color`` records it.
- A single image without ImagePositionPatient (CR, DX, MG, US) is a one-slice Volume of kind
  ``IMAGE``; pixel spacing comes from PixelSpacing when it is above 0, else ImagerPixelSpacing
  (divided by EstimatedRadiographicMagnificationFactor when that is present, so it is the size
  at the patient rather than at the detector), else the ultrasound region calibration. A zero,
  negative or absent spacing is never taken as 1 mm for a measurement: the grid carries 1.0 so
  that resampling has a number, ``spacing_known`` is False and every size is "not measurable".
  ``spacing_source`` says in words where a known spacing came from (PS3.3 C.7.6.3.1.7 and
  C.8.11.1.1: Pixel Spacing with its Pixel Spacing Calibration Type, or Imager Pixel Spacing)
  for the report. A multi-frame image without plane positions
  (cine) is kind ``FRAMES``: frames stacked in file order, ``dz`` meaningless.

Memory: headers are read first (no pixel data), the output array is allocated once, and frames are
decoded one at a time straight into it, so pixel data is never held twice.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs_node.errors import VolumeError

log = logging.getLogger(__name__)

_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")

# Tolerances, in mm or as fractions; named so a reader sees what "the same" means.
_ORIENTATION_TOL = 1e-3  # max abs difference of direction cosines
_SAME_POSITION_MM = 0.01  # two slices closer than this along the normal share a position
_MAX_LOCALIZER_IMAGES = 3  # a minority geometry group this small is dropped as a localizer
_DYNAMIC_FRACTION = 0.5  # more repeated positions than this fraction: a 4D series


class VolumeKind(StrEnum):
    """What the slice axis means."""

    SERIES = "series"  # cross-sectional slices with patient positions: dz is real
    IMAGE = "image"  # one 2D image (projection radiograph, ultrasound, secondary capture)
    FRAMES = "frames"  # multi-frame without plane positions (cine): z is frame order


@dataclass(frozen=True, slots=True)
class Dropped:
    """A source image or frame left out of the Volume, and why (shown to the user and logged)."""

    sop_instance_uid: str
    frame_number: int | None
    reason: str


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in patient space: array shape ``(z, y, x)`` and the 4x4 affine mapping
    homogeneous array-order indices ``(z, y, x, 1)`` to LPS mm."""

    shape: tuple[int, int, int]
    affine: NDArray[np.float64]

    @classmethod
    def from_geometry(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] | NDArray[np.float64],
        direction: NDArray[np.float64],
    ) -> Grid:
        """Build from Volume-style geometry (spacing z,y,x; direction columns x,y,z)."""
        direction = np.asarray(direction, dtype=np.float64)
        affine = np.eye(4)
        affine[:3, 0] = direction[:, 2] * spacing[0]
        affine[:3, 1] = direction[:, 1] * spacing[1]
        affine[:3, 2] = direction[:, 0] * spacing[2]
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
        affine.setflags(write=False)
        return cls((int(shape[0]), int(shape[1]), int(shape[2])), affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) in mm."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def index_to_patient(self, zyx: ArrayLike) -> NDArray[np.float64]:
        """LPS mm of array-order indices; ``zyx`` has shape (3,) or (n, 3)."""
        idx = np.asarray(zyx, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, lps: ArrayLike) -> NDArray[np.float64]:
        """Continuous array-order indices of LPS points; inverse of :meth:`index_to_patient`."""
        pts = np.asarray(lps, dtype=np.float64) - self.affine[:3, 3]
        solved = np.linalg.solve(self.affine[:3, :3], pts.T).T
        return np.asarray(solved, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels of one series on a regular grid, with the geometry and sources needed to write
    results that a PACS overlays on the right pixels. See the module docstring for conventions."""

    voxels: NDArray[Any]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: NDArray[np.float64]
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    headers: tuple[Dataset, ...]
    modality: str
    kind: VolumeKind = VolumeKind.SERIES
    spacing_known: bool = True
    spacing_source: str = ""  # where a known pixel spacing came from, in words (for reports)
    inverted: bool = False
    from_color: bool = False
    dropped: tuple[Dropped, ...] = ()
    filled_slices: tuple[int, ...] = ()
    series_instance_uid: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.voxels.shape
        return (int(z), int(y), int(x))

    @property
    def grid(self) -> Grid:
        return Grid.from_geometry(self.shape, self.spacing, self.origin, self.direction)

    def affine_lps(self) -> NDArray[np.float64]:
        """4x4 from array-order indices (z, y, x, 1) to LPS mm."""
        return np.array(self.grid.affine)

    def affine_ras(self) -> NDArray[np.float64]:
        """4x4 from array-order indices (z, y, x, 1) to RAS mm: the NIfTI affine for ``voxels``
        (or a label array on this grid) saved without transposing."""
        result: NDArray[np.float64] = _LPS_TO_RAS @ self.affine_lps()
        return result

    def index_to_patient(self, zyx: ArrayLike) -> NDArray[np.float64]:
        """LPS mm of array-order indices (z, y, x); shape (3,) or (n, 3)."""
        return self.grid.index_to_patient(zyx)

    def patient_to_index(self, lps: ArrayLike) -> NDArray[np.float64]:
        """Continuous array-order indices (z, y, x) of LPS points."""
        return self.grid.patient_to_index(lps)


# --------------------------------------------------------------------------- reading headers


@dataclass(slots=True)
class _Slice:
    """What one frame contributes, read from headers only."""

    source: int  # index into the inputs
    frame: int | None  # 0-based frame index in a multi-frame source, None for single-frame
    sop_uid: str
    instance_number: int | None
    acquisition: str | None
    localizer: bool
    orientation: NDArray[np.float64] | None  # 6 direction cosines
    position: NDArray[np.float64] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    slope: float
    intercept: float
    thickness: float | None


def _floats(value: Any, n: int) -> NDArray[np.float64] | None:
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_value(groups: Sequence[Dataset | None], seq_kw: str, kw: str) -> Any:
    """An attribute from a functional group: per-frame first, then shared."""
    for group in groups:
        if group is None:
            continue
        item = _item(group, seq_kw)
        if item is not None and kw in item:
            return item.get(kw)
    return None


def _optional_float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _optional_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    arr = _floats(value, 2)
    if arr is None or np.any(arr <= 0):
        return None
    return (float(arr[0]), float(arr[1]))


def _slices_of(index: int, ds: Dataset) -> list[_Slice]:
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise VolumeError(f"instance {sop_uid}: no image (Rows/Columns absent)")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    frames = _optional_int(ds.get("NumberOfFrames")) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    instance_number = _optional_int(ds.get("InstanceNumber"))
    acquisition = ds.get("AcquisitionNumber")
    result: list[_Slice] = []
    if per_frame is not None or shared is not None:
        for f in range(frames):
            pf = per_frame[f] if per_frame is not None and f < len(per_frame) else None
            groups = (pf, shared)
            frame_type = _group_value(groups, "CTImageFrameTypeSequence", "FrameType")
            if frame_type is None:
                frame_type = _group_value(groups, "MRImageFrameTypeSequence", "FrameType")
            types = [str(v).upper() for v in (frame_type or image_type)]
            frame_acq = _group_value(groups, "FrameContentSequence", "FrameAcquisitionNumber")
            slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            result.append(
                _Slice(
                    source=index,
                    frame=f,
                    sop_uid=sop_uid,
                    instance_number=instance_number,
                    acquisition=None if frame_acq is None else str(frame_acq),
                    localizer="LOCALIZER" in types,
                    orientation=_floats(
                        _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient"),
                        6,
                    ),
                    position=_floats(
                        _group_value(groups, "PlanePositionSequence", "ImagePositionPatient"), 3
                    ),
                    pixel_spacing=_spacing_pair(
                        _group_value(groups, "PixelMeasuresSequence", "PixelSpacing")
                    ),
                    rows=rows,
                    columns=columns,
                    slope=_optional_float(slope) or 1.0,
                    intercept=_optional_float(intercept) or 0.0,
                    thickness=_optional_float(
                        _group_value(groups, "PixelMeasuresSequence", "SliceThickness")
                    ),
                )
            )
        return result
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    position = _floats(ds.get("ImagePositionPatient"), 3) if frames == 1 else None
    pixel_spacing = _spacing_pair(ds.get("PixelSpacing"))
    slope = _optional_float(ds.get("RescaleSlope")) or 1.0
    intercept = _optional_float(ds.get("RescaleIntercept")) or 0.0
    thickness = _optional_float(ds.get("SliceThickness"))
    return [
        _Slice(
            source=index,
            frame=None if frames == 1 else f,
            sop_uid=sop_uid,
            instance_number=instance_number,
            acquisition=None if acquisition in (None, "") else str(acquisition),
            localizer="LOCALIZER" in image_type,
            orientation=orientation,
            position=position,
            pixel_spacing=pixel_spacing,
            rows=rows,
            columns=columns,
            slope=slope,
            intercept=intercept,
            thickness=thickness,
        )
        for f in range(frames)
    ]


def _header_only(ds: Dataset) -> Dataset:
    """A copy without pixel data, so a Volume can reference its sources cheaply."""
    header = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            header.add(elem)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def _read_headers(sources: Sequence[str | os.PathLike[str] | Dataset]) -> list[Dataset]:
    headers: list[Dataset] = []
    for src in sources:
        if isinstance(src, Dataset):
            headers.append(_header_only(src))
            continue
        try:
            headers.append(dcmread(src, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise VolumeError(f"{Path(src).name}: not a readable DICOM file ({exc})") from exc
    return headers


# --------------------------------------------------------------------------- choosing slices


def _unit_normal(orientation: NDArray[np.float64]) -> NDArray[np.float64]:
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise VolumeError("ImageOrientationPatient row and column vectors are parallel")
    result: NDArray[np.float64] = normal / norm
    return result


def _same_geometry(a: _Slice, b: _Slice) -> bool:
    if (a.rows, a.columns) != (b.rows, b.columns):
        return False
    if (a.orientation is None) != (b.orientation is None):
        return False
    if (
        a.orientation is not None
        and b.orientation is not None
        and np.max(np.abs(a.orientation - b.orientation)) > _ORIENTATION_TOL
    ):
        return False
    if (a.pixel_spacing is None) != (b.pixel_spacing is None):
        return False
    if a.pixel_spacing is not None and b.pixel_spacing is not None:
        return bool(np.allclose(a.pixel_spacing, b.pixel_spacing, rtol=1e-3, atol=1e-4))
    return True


def _describe(s: _Slice) -> str:
    orient = "none" if s.orientation is None else "[" + ", ".join(f"{v:.3g}" for v in s.orientation)
    spacing = "none" if s.pixel_spacing is None else "x".join(f"{v:g}" for v in s.pixel_spacing)
    closing = "" if s.orientation is None else "]"
    return f"orientation {orient}{closing}, {s.rows}x{s.columns} px, spacing {spacing}"


def _drop(slices: Iterable[_Slice], reason: str) -> list[Dropped]:
    return [Dropped(s.sop_uid, None if s.frame is None else s.frame + 1, reason) for s in slices]


def _select_geometry(slices: list[_Slice], dropped: list[Dropped]) -> list[_Slice]:
    """Drop localizers and small odd-geometry groups; refuse a real mixture."""
    kept = [s for s in slices if not s.localizer]
    dropped.extend(_drop((s for s in slices if s.localizer), "ImageType LOCALIZER"))
    if not kept:
        raise VolumeError("the series holds only localizer images")
    groups: list[list[_Slice]] = []
    for s in kept:
        for group in groups:
            if _same_geometry(group[0], s):
                group.append(s)
                break
        else:
            groups.append([s])
    if len(groups) == 1:
        return kept
    groups.sort(key=len, reverse=True)
    main, others = groups[0], groups[1:]
    minority = sum(len(g) for g in others)
    if all(len(g) <= _MAX_LOCALIZER_IMAGES for g in others) and len(main) > minority:
        for group in others:
            dropped.extend(
                _drop(group, f"geometry differs from the series ({_describe(group[0])}): localizer")
            )
        return main
    described = "; ".join(f"{len(g)} images with {_describe(g[0])}" for g in groups)
    raise VolumeError(f"mixed orientations or matrix sizes in one series: {described}")


def _dedupe(
    slices: list[_Slice], along: NDArray[np.float64], dropped: list[Dropped]
) -> tuple[list[_Slice], NDArray[np.float64]]:
    """Refuse overlapping acquisitions and 4D series; keep one slice per position."""
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    clusters: list[list[int]] = [[0]]
    for i in range(1, len(slices)):
        if along[i] - along[clusters[-1][0]] < _SAME_POSITION_MM:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    repeated = [c for c in clusters if len(c) > 1]
    if not repeated:
        return slices, along
    for cluster in repeated:
        acquisitions = {slices[i].acquisition for i in cluster} - {None}
        if len(acquisitions) > 1:
            counts = Counter(s.acquisition for s in slices)
            listed = ", ".join(f"{a}: {n} slices" for a, n in sorted(counts.items(), key=str))
            raise VolumeError(
                f"several acquisitions cover the same positions ({listed}); "
                "split them into series or pick one before segmenting"
            )
    if len(repeated) > _DYNAMIC_FRACTION * len(clusters):
        most = max(len(c) for c in repeated)
        raise VolumeError(
            f"{len(repeated)} of {len(clusters)} slice positions repeat (up to {most} times): "
            "a dynamic or multi-phase series, not one volume"
        )
    keep: list[int] = []
    for cluster in clusters:

        def rank(i: int) -> tuple[float, str, int]:
            s = slices[i]
            number = math.inf if s.instance_number is None else float(s.instance_number)
            return (number, s.sop_uid, -1 if s.frame is None else s.frame)

        ordered = sorted(cluster, key=rank)
        keep.append(ordered[0])
        winner = slices[ordered[0]]
        dropped.extend(
            _drop(
                (slices[i] for i in ordered[1:]),
                f"duplicate of slice position {along[ordered[0]]:.3f} mm; kept InstanceNumber "
                f"{winner.instance_number} ({winner.sop_uid})",
            )
        )
    return [slices[i] for i in keep], along[keep]


@dataclass(slots=True)
class _Layout:
    """Sorted slices and the grid they sit on; ``slots[i]`` is the z index of ``slices[i]``."""

    slices: list[_Slice]
    slots: list[int]
    depth: int
    dz: float
    origin: NDArray[np.float64]
    direction: NDArray[np.float64]
    filled: list[int]


def _layout_series(
    slices: list[_Slice],
    dropped: list[Dropped],
    *,
    max_gap_ratio: float,
    spacing_tolerance: float,
    fill_gaps: bool,
) -> _Layout:
    orientation = slices[0].orientation
    if orientation is None:
        raise VolumeError("slices without ImageOrientationPatient cannot be stacked")
    normal = _unit_normal(orientation)
    row = orientation[:3] / float(np.linalg.norm(orientation[:3]))
    col = orientation[3:] / float(np.linalg.norm(orientation[3:]))
    positions = np.array([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    slices, along = _dedupe(slices, along, dropped)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    direction = np.column_stack([row, col, normal])
    if len(slices) == 1:
        thickness = slices[0].thickness
        dz = thickness if thickness and thickness > 0 else 1.0
        return _Layout(slices, [0], 1, dz, positions[0], direction, [])
    # Tilt: any in-plane drift of the slice positions relative to the first one.
    offsets = positions - positions[0]
    inplane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.max(np.linalg.norm(inplane, axis=1)))
    pixel = min(slices[0].pixel_spacing or (1.0, 1.0))
    if drift > max(0.01, 0.1 * pixel):
        length = float(along[-1] - along[0])
        angle = math.degrees(math.atan2(float(np.linalg.norm(inplane[-1])), length))
        raise VolumeError(
            f"gantry tilt: slice positions drift {drift:.2f} mm off the slice normal "
            f"(about {angle:.1f} degrees over {length:.1f} mm); tilted series are refused, "
            "not resampled"
        )
    gaps = np.diff(along)
    median = float(np.median(gaps))
    ratios = gaps / median
    steps = np.rint(ratios).astype(int)
    if np.any(ratios > max_gap_ratio):
        worst = int(np.argmax(ratios))
        whole = bool(np.all(np.abs(ratios - steps) <= spacing_tolerance)) and np.all(steps >= 1)
        if not (fill_gaps and whole):
            missing = int(np.sum(np.maximum(steps - 1, 0)))
            raise VolumeError(
                f"missing slices: a gap of {gaps[worst]:.2f} mm between slice positions "
                f"{along[worst]:.2f} and {along[worst + 1]:.2f} mm is "
                f"{ratios[worst]:.1f} x the median spacing {median:.2f} mm "
                f"(about {missing} slices missing)"
                + ("" if fill_gaps else "; pass fill_gaps=True to pad them with blank slices")
            )
    else:
        steps = np.ones_like(steps)
    slots = [0, *np.cumsum(steps).tolist()]
    depth = slots[-1] + 1
    dz = float(along[-1] - along[0]) / (depth - 1)
    deviation = np.abs((along - along[0]) - np.array(slots) * dz)
    if float(np.max(deviation)) > spacing_tolerance * dz:
        worst = int(np.argmax(deviation))
        raise VolumeError(
            f"uneven slice spacing: gaps range from {gaps.min():.2f} to {gaps.max():.2f} mm "
            f"(slice at {along[worst]:.2f} mm is {deviation[worst]:.2f} mm off a regular grid "
            f"of {dz:.2f} mm); no regular grid holds this series"
        )
    filled = sorted(set(range(depth)) - set(slots))
    return _Layout(slices, slots, depth, dz, positions[0], direction, filled)


# --------------------------------------------------------------------------- pixels


def _stored_range(header: Dataset) -> tuple[int, int]:
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 16)
    if int(header.get("PixelRepresentation") or 0) == 1:
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (0, 2**bits - 1)


def _is_color(header: Dataset) -> bool:
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    return int(header.get("SamplesPerPixel") or 1) > 1 or photometric == "PALETTE COLOR"


def _choose_dtype(slices: Sequence[_Slice], headers: Sequence[Dataset]) -> np.dtype[Any]:
    info = np.iinfo(np.int16)
    for s in slices:
        header = headers[s.source]
        if _is_color(header):
            return np.dtype(np.float32)
        if s.slope != int(s.slope) or s.intercept != int(s.intercept):
            return np.dtype(np.float32)
        lo, hi = _stored_range(header)
        ends = (s.slope * lo + s.intercept, s.slope * hi + s.intercept)
        if min(ends) < info.min or max(ends) > info.max:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _to_plane(
    frame: NDArray[Any], header: Dataset, s: _Slice, dtype: np.dtype[Any]
) -> NDArray[Any]:
    """One decoded frame as rescaled, monochrome-2 style values of the output dtype."""
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, header)
    if frame.ndim == 3:
        return np.asarray(frame[..., :3].astype(np.float32) @ _LUMA, dtype=dtype)
    values: NDArray[Any]
    if dtype == np.int16:
        values = frame.astype(np.int32) * int(s.slope) + int(s.intercept)
    else:
        values = frame.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
    if photometric == "MONOCHROME1":
        lo, hi = _stored_range(header)
        ends = sorted((s.slope * lo + s.intercept, s.slope * hi + s.intercept))
        values = (ends[0] + ends[1]) - values
    return np.asarray(values, dtype=dtype)


def _decode_into(
    out: NDArray[Any],
    slices: Sequence[_Slice],
    slots: Sequence[int],
    sources: Sequence[str | os.PathLike[str] | Dataset],
    headers: Sequence[Dataset],
) -> None:
    """Decode frame by frame straight into ``out``; one source file is read once."""
    by_source: dict[int, list[tuple[_Slice, int]]] = {}
    for s, slot in zip(slices, slots, strict=True):
        by_source.setdefault(s.source, []).append((s, slot))
    for index, items in by_source.items():
        items.sort(key=lambda pair: -1 if pair[0].frame is None else pair[0].frame)
        src = sources[index]
        src_arg: Any = src if isinstance(src, Dataset) else os.fspath(src)
        syntax = getattr(headers[index], "file_meta", Dataset()).get("TransferSyntaxUID")
        if syntax == DeflatedExplicitVRLittleEndian and not isinstance(src, Dataset):
            src_arg = dcmread(src_arg)  # frame-wise reading cannot inflate; a whole read can
        indices = [0 if s.frame is None else s.frame for s, _ in items]
        try:
            # as_rgb converts YBR to RGB; palette colour is expanded by _to_plane
            frames = iter_pixels(src_arg, indices=indices, as_rgb=True)
            for (s, slot), frame in zip(items, frames, strict=True):
                plane = _to_plane(frame, headers[index], s, out.dtype)
                if plane.shape != out.shape[1:]:
                    raise VolumeError(
                        f"instance {s.sop_uid}: decoded frame has shape {plane.shape}, "
                        f"expected {out.shape[1:]}"
                    )
                out[slot] = plane
        except VolumeError:
            raise
        except (ValueError, RuntimeError, NotImplementedError, OSError, KeyError) as exc:
            raise VolumeError(
                f"instance {items[0][0].sop_uid}: pixel data cannot be decoded ({exc})"
            ) from exc


# --------------------------------------------------------------------------- 2D calibration


def _ultrasound_spacing(header: Dataset) -> tuple[float, float] | None:
    """Pixel size from the first calibrated ultrasound region (units cm) as (row, column) mm."""
    for region in header.get("SequenceOfUltrasoundRegions") or []:
        units_x = _optional_int(region.get("PhysicalUnitsXDirection"))
        units_y = _optional_int(region.get("PhysicalUnitsYDirection"))
        dx = _optional_float(region.get("PhysicalDeltaX"))
        dy = _optional_float(region.get("PhysicalDeltaY"))
        if units_x == 3 and units_y == 3 and dx and dy and dx > 0 and dy > 0:  # 3 = cm
            return (abs(dy) * 10.0, abs(dx) * 10.0)
    return None


def _planar_spacing(header: Dataset, s: _Slice) -> tuple[tuple[float, float], str] | None:
    """The pixel size (row, column) mm and where it came from; None when none is usable."""
    if s.pixel_spacing is not None:
        calibration = str(header.get("PixelSpacingCalibrationType", "") or "")
        detail = f" (calibration {calibration})" if calibration else ""
        return s.pixel_spacing, f"Pixel Spacing{detail}"
    imager = _spacing_pair(header.get("ImagerPixelSpacing"))
    if imager is not None:
        factor = _optional_float(header.get("EstimatedRadiographicMagnificationFactor"))
        if factor is not None and factor > 0:
            return (
                (imager[0] / factor, imager[1] / factor),
                f"Imager Pixel Spacing / Estimated Radiographic Magnification Factor {factor:g}",
            )
        return imager, "Imager Pixel Spacing (at the detector, not corrected for magnification)"
    ultrasound = _ultrasound_spacing(header)
    if ultrasound is not None:
        return ultrasound, "ultrasound region calibration"
    return None


# --------------------------------------------------------------------------- entry point


def load_series(
    sources: Sequence[str | os.PathLike[str] | Dataset],
    *,
    max_gap_ratio: float = 1.5,
    spacing_tolerance: float = 0.1,
    fill_gaps: bool = False,
) -> Volume:
    """Read one series (files or datasets) into a Volume, or say why it cannot be one.

    ``max_gap_ratio``: a gap larger than this times the median slice spacing counts as missing
    slices. ``spacing_tolerance``: how far (fraction of a slice) a slice may sit off the regular
    grid. ``fill_gaps``: pad whole missing slices with blank ones instead of refusing.
    """
    if not sources:
        raise VolumeError("no instances given")
    headers = _read_headers(sources)
    slices: list[_Slice] = []
    seen: set[tuple[str, int | None]] = set()
    dropped: list[Dropped] = []
    for index, header in enumerate(headers):
        for s in _slices_of(index, header):
            key = (s.sop_uid, s.frame)
            if key in seen:
                dropped.extend(_drop([s], "the same instance was given twice"))
                continue
            seen.add(key)
            slices.append(s)
    series_uids = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series_uids) > 1:
        raise VolumeError(f"instances from {len(series_uids)} series; load one series at a time")
    slices = _select_geometry(slices, dropped)
    first = slices[0]
    first_header = headers[first.source]
    positioned = [s for s in slices if s.position is not None and s.orientation is not None]
    if positioned and len(positioned) == len(slices):
        layout = _layout_series(
            slices,
            dropped,
            max_gap_ratio=max_gap_ratio,
            spacing_tolerance=spacing_tolerance,
            fill_gaps=fill_gaps,
        )
        kind = VolumeKind.SERIES
        found = _planar_spacing(headers[layout.slices[0].source], layout.slices[0])
    elif positioned:
        raise VolumeError(
            f"{len(slices) - len(positioned)} of {len(slices)} images lack "
            "ImagePositionPatient/ImageOrientationPatient"
        )
    else:
        sources_used = {s.source for s in slices}
        if len(sources_used) > 1:
            raise VolumeError(
                f"{len(sources_used)} images without ImagePositionPatient: separate 2D images, "
                "not a volume; load each image on its own"
            )
        kind = VolumeKind.IMAGE if len(slices) == 1 else VolumeKind.FRAMES
        slices.sort(key=lambda s: -1 if s.frame is None else s.frame)
        found = _planar_spacing(first_header, first)
        orientation = first.orientation
        if orientation is not None:
            normal = _unit_normal(orientation)
            direction = np.column_stack([orientation[:3], orientation[3:], normal])
        else:
            direction = np.eye(3)
        origin = _floats(first_header.get("ImagePositionPatient"), 3)
        layout = _Layout(
            slices=slices,
            slots=list(range(len(slices))),
            depth=len(slices),
            dz=first.thickness if first.thickness and first.thickness > 0 else 1.0,
            origin=np.zeros(3) if origin is None else origin,
            direction=direction,
            filled=[],
        )
    planar, spacing_source = found or ((1.0, 1.0), "")
    spacing_known = found is not None
    dtype = _choose_dtype(layout.slices, headers)
    voxels = np.empty((layout.depth, first.rows, first.columns), dtype=dtype)
    _decode_into(voxels, layout.slices, layout.slots, sources, headers)
    if layout.filled:
        voxels[layout.filled] = min(voxels[k].min() for k in layout.slots)
    voxels.setflags(write=False)  # a Volume is shared by every stage; nobody edits it in place
    uids = [""] * layout.depth
    frames: list[int | None] = [None] * layout.depth
    for s, slot in zip(layout.slices, layout.slots, strict=True):
        uids[slot] = s.sop_uid
        frames[slot] = None if s.frame is None else s.frame + 1
    photometrics = {str(headers[s.source].get("PhotometricInterpretation", "")) for s in slices}
    used_sources = sorted({s.source for s in layout.slices})
    volume = Volume(
        voxels=voxels,
        spacing=(float(layout.dz), float(planar[0]), float(planar[1])),
        origin=(float(layout.origin[0]), float(layout.origin[1]), float(layout.origin[2])),
        direction=_readonly(layout.direction),
        sop_instance_uids=tuple(uids),
        frame_numbers=tuple(frames),
        headers=tuple(headers[i] for i in used_sources),
        modality=str(first_header.get("Modality", "")),
        kind=kind,
        spacing_known=spacing_known,
        spacing_source=spacing_source,
        inverted="MONOCHROME1" in photometrics,
        from_color=any(_is_color(headers[i]) for i in used_sources),
        dropped=tuple(dropped),
        filled_slices=tuple(layout.filled),
        series_instance_uid=str(first_header.get("SeriesInstanceUID", "")),
    )
    log.debug(
        "series loaded",
        extra={
            "series_uid": volume.series_instance_uid,
            "shape": volume.shape,
            "dropped": len(dropped),
            "filled": len(layout.filled),
        },
    )
    return volume


def _readonly(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    result = np.array(matrix, dtype=np.float64)
    result.setflags(write=False)
    return result
