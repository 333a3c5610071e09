"""The result viewer's data: a job's source series as the Volume the job segmented, its stored
DICOM-SEG as a label array on that Volume's grid, the SR's measurements and the stored PDF.

Geometry: SEG frames reference their source images (Derivation Image / Source Image per frame,
written by highdicom), so the label array is read back per source SOP Instance UID (per frame
for a multi-frame source) in the Volume's own slice order; the viewer shows each slice as
stored, rows down and columns across, which for an axial CT puts the patient's right on the
screen's left (the edge letters say which way each edge faces).

A loaded stack is kept in a small LRU cache per web app (:class:`StackCache`), so paging
through slices decodes the series once.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy import select

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import Instance, Job, Result, Series, Study
from pacs_node.config import Settings
from pacs_node.errors import RequestError
from pacs_node.outputs import OutputKind

# Window presets (centre, width) for CT, in HU, as radiologists name them.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
AUTO_PERCENTILES = (1.0, 99.0)  # an image's own window when it has no preset
_LPS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # (-, +) along x, y, z of LPS
_OBLIQUE_SHARE = 0.35  # a direction's second axis named too above this cosine


class NoSuchResult(RequestError):
    """No such job for this study, or the job has nothing the viewer can show."""


@dataclass(frozen=True, slots=True)
class JobFiles:
    """Where a job's source series and stored results are."""

    job_id: int
    study_uid: str
    model: str
    state: str
    series_uid: str  # the series shown
    series: tuple[str, ...]  # every series the job processed
    sources: tuple[Path, ...]
    results: dict[str, tuple[Path, ...]]  # result kind -> files (preferred encoding each)
    key: tuple[Any, ...]  # the series shown, and it changes when the job's results do
    decision: str | None = None  # a person's (or the quality gate's) review: jobs.qa_decision

    def of_series(self, kind: OutputKind) -> tuple[Path, ...]:
        """The stored objects of ``kind`` made from the series shown: a SEG or SR whose
        references name it (Referenced Series, the SR's evidence); of any other kind (the PDF,
        one per series, stored in the job's series order) the one at the series' place."""
        paths = self.results.get(kind.value, ())
        if kind in (OutputKind.SEG, OutputKind.SR):
            return tuple(p for p in paths if self.series_uid in _referenced_series(p))
        place = self.series.index(self.series_uid)  # one per series, in the job's order
        return paths[place : place + 1] if len(paths) == len(self.series) else paths[:1]


def job_files(
    catalog: Catalog, settings: Settings, study_uid: str, job_id: int, series_uid: str = ""
) -> JobFiles:
    """A job of ``study_uid`` and its files for one of its series (``series_uid``, default
    its first); :class:`NoSuchResult` when there is no such job or series."""
    results_root = settings.node.data_dir / "results"
    with catalog.sessions() as session:
        job = session.execute(
            select(Job)
            .join(Study, Study.id == Job.study_id)
            .where(Job.id == job_id, Study.study_uid == study_uid)
        ).scalar_one_or_none()
        if job is None:
            raise NoSuchResult(f"no job {job_id} for study {study_uid}")
        if not job.series_uids:
            raise NoSuchResult(f"job {job_id} names no series")
        series = [str(uid) for uid in job.series_uids]
        series_uid = series_uid or series[0]
        if series_uid not in series:
            raise NoSuchResult(f"job {job_id} did not process series {series_uid}")
        paths = session.scalars(
            select(Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == series_uid, Series.study_id == job.study_id)
            .order_by(Instance.id)
        ).all()
        rows = session.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.id))
        results: dict[str, list[Path]] = {}
        ids = []
        for row in rows:
            ids.append(row.id)
            if row.encodings:
                first = next(iter(row.encodings.values()))
                results.setdefault(row.kind, []).append(results_root / first)
        return JobFiles(
            job_id=job.id,
            study_uid=study_uid,
            model=job.model,
            state=job.state.value,
            decision=job.qa_decision,
            series_uid=series_uid,
            series=tuple(series),
            sources=tuple(settings.node.spool_dir / p for p in paths),
            results={kind: tuple(files) for kind, files in results.items()},
            key=(job.id, series_uid, job.attempts, tuple(ids)),
        )


@dataclass(frozen=True, slots=True)
class SegmentLegend:
    number: int  # the SEG's segment number, the value in the label array
    label: str
    color: tuple[int, int, int]  # the SEG's recommended display colour, as sRGB

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)


@dataclass(frozen=True, slots=True)
class EdgeLetters:
    """Which way the screen's edges face in the patient (PS3.3 C.7.6.1.1.1 letters)."""

    left: str
    right: str
    top: str
    bottom: str


@dataclass(frozen=True, eq=False)
class ViewerStack:
    """One series ready to page through: voxels (z, y, x) and labels on the same grid."""

    key: tuple[Any, ...]
    voxels: NDArray[Any]
    labels: NDArray[np.unsignedinteger[Any]]  # segment numbers, 0: none
    segments: tuple[SegmentLegend, ...]
    modality: str
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    edges: EdgeLetters
    auto_window: tuple[float, float]  # (centre, width) from the image itself

    @property
    def slices(self) -> int:
        return int(self.voxels.shape[0])

    @property
    def rows(self) -> int:
        return int(self.voxels.shape[1])

    @property
    def columns(self) -> int:
        return int(self.voxels.shape[2])

    def presets(self) -> dict[str, tuple[float, float]]:
        """The window presets offered: CT's named ones, else the image's own."""
        if self.modality == "CT":
            return dict(CT_PRESETS)
        return {"auto": self.auto_window}

    def default_window(self) -> tuple[float, float]:
        return CT_PRESETS["soft tissue"] if self.modality == "CT" else self.auto_window

    def slice_png(self, index: int, centre: float, width: float) -> bytes:
        """Slice ``index`` windowed to 8-bit grey (higher values brighter) as a PNG."""
        plane = np.asarray(self._plane(self.voxels, index), dtype=np.float32)
        width = max(float(width), 1.0)
        low = centre - width / 2
        grey = np.clip((plane - low) / width, 0.0, 1.0) * 255.0
        return _png(Image.fromarray(np.rint(grey).astype(np.uint8), mode="L"))

    def labels_png(self, index: int, shown: Sequence[int] | None = None) -> bytes:
        """Slice ``index`` of the labels as an RGBA PNG: each segment of ``shown`` (all when
        None) in its colour, opaque; everything else transparent."""
        plane = self._plane(self.labels, index)
        lut = np.zeros((int(max((s.number for s in self.segments), default=0)) + 1, 4), np.uint8)
        wanted = None if shown is None else set(shown)
        for segment in self.segments:
            if wanted is None or segment.number in wanted:
                lut[segment.number] = (*segment.color, 255)
        rgba = lut[np.clip(plane, 0, lut.shape[0] - 1)]
        return _png(Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA"))

    def _plane(self, array: NDArray[Any], index: int) -> NDArray[Any]:
        if not 0 <= index < self.slices:
            raise NoSuchResult(f"slice {index} is outside 0..{self.slices - 1}")
        return np.asarray(array[index])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _letters(vector: NDArray[np.float64]) -> str:
    """Patient-direction letters of an LPS unit vector, strongest axis first."""
    order = np.argsort(-np.abs(vector))
    letters = [
        _LPS_LETTERS[axis][int(vector[axis] > 0)]
        for n, axis in enumerate(order)
        if n == 0 or abs(vector[axis]) > _OBLIQUE_SHARE
    ]
    return "".join(letters)


def edge_letters(direction: NDArray[np.float64]) -> EdgeLetters:
    """Edge letters of a slice shown as stored: columns increase to the right along the
    direction's column 0, rows increase downwards along column 1."""
    across, down = np.asarray(direction[:, 0]), np.asarray(direction[:, 1])
    return EdgeLetters(
        left=_letters(-across), right=_letters(across), top=_letters(-down), bottom=_letters(down)
    )


_OPPOSITE = str.maketrans("LRAPHFSI", "RLPAFHIS")
NO_EDGES = EdgeLetters("", "", "", "")


def image_edge_letters(header: Any) -> EdgeLetters:
    """Edge letters of an image without plane geometry (a radiograph) from its Patient
    Orientation (PS3.3 C.7.6.1.1.1: the row direction, then the column direction); none when
    it states none."""
    value = header.get("PatientOrientation")
    if not value or len(value) != 2:
        return NO_EDGES
    across, down = str(value[0]), str(value[1])
    return EdgeLetters(
        left=across.translate(_OPPOSITE), right=across, top=down.translate(_OPPOSITE), bottom=down
    )


def _auto_window(voxels: NDArray[Any]) -> tuple[float, float]:
    sample = np.asarray(voxels[:: max(1, voxels.shape[0] // 16)], dtype=np.float32)
    low, high = np.percentile(sample, AUTO_PERCENTILES)
    width = max(float(high - low), 1.0)
    return (float(low) + width / 2, width)


def _legend(seg: Any) -> tuple[SegmentLegend, ...]:
    import highdicom as hd

    legend = []
    for item in seg.SegmentSequence:
        color = (128, 128, 128)
        if "RecommendedDisplayCIELabValue" in item:
            lab = hd.color.CIELabColor.from_dicom_value(
                tuple(int(v) for v in item.RecommendedDisplayCIELabValue)
            )
            color = tuple(int(c) for c in lab.to_rgb(clip=True))  # type: ignore[assignment]
        legend.append(SegmentLegend(int(item.SegmentNumber), str(item.SegmentLabel), color))
    return tuple(legend)


def _seg_labels(seg: Any, uids: Sequence[str], frames: Sequence[int | None]) -> NDArray[Any]:
    """The SEG's segment numbers for each (source instance, frame), in that order."""
    fractional = str(seg.SegmentationType) == "FRACTIONAL"
    options: dict[str, Any] = {
        "assert_missing_frames_are_empty": True,
        "combine_segments": not fractional,
        "skip_overlap_checks": True,
    }
    if all(frame is None for frame in frames):
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(uids), **options)
    elif len(set(uids)) == 1:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=uids[0],
            source_frame_numbers=[int(f or 1) for f in frames],
            **options,
        )
    else:
        raise NoSuchResult("a series of several multi-frame images: not shown in the viewer")
    if not fractional:
        return np.asarray(pixels)
    numbers = np.array([int(s.SegmentNumber) for s in seg.SegmentSequence])
    strongest = np.argmax(pixels, axis=-1)
    return np.where(np.max(pixels, axis=-1) >= 0.5, numbers[strongest], 0)


def _referenced_series(path: Path) -> set[str]:
    """The source series an object names: a SEG's Referenced Series, an SR's evidence."""
    from pydicom import dcmread

    header = dcmread(path, stop_before_pixels=True)
    items = list(header.get("ReferencedSeriesSequence", []))
    for evidence in header.get("CurrentRequestedProcedureEvidenceSequence", []):
        items.extend(evidence.get("ReferencedSeriesSequence", []))
    return {str(item.get("SeriesInstanceUID", "")) for item in items}


def load_stack(files: JobFiles) -> ViewerStack:
    """Decode the job's source series and read its SEG onto the same slices."""
    from pacs_node.imaging.volume import VolumeKind, load_series

    if not files.sources:
        raise NoSuchResult(f"series {files.series_uid} has no stored instances")
    volume = load_series(files.sources)
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    legend: tuple[SegmentLegend, ...] = ()
    segs = files.of_series(OutputKind.SEG)
    if segs:
        seg_path = segs[0]
        import highdicom as hd

        seg = hd.seg.segread(seg_path)
        legend = _legend(seg)
        if max((s.number for s in legend), default=0) > np.iinfo(np.uint8).max:
            labels = labels.astype(np.uint16)
        known = [z for z, uid in enumerate(volume.sop_instance_uids) if uid]
        found = _seg_labels(
            seg,
            [volume.sop_instance_uids[z] for z in known],
            [volume.frame_numbers[z] for z in known],
        )
        labels[known] = found.reshape(len(known), *volume.voxels.shape[1:])
    if volume.kind is VolumeKind.SERIES:
        edges = edge_letters(volume.direction)
    else:  # no plane position: the orientation, if any, is the image's own statement
        edges = image_edge_letters(volume.headers[0]) if volume.headers else NO_EDGES
    return ViewerStack(
        key=files.key,
        voxels=volume.voxels,
        labels=labels,
        segments=legend,
        modality=volume.modality,
        pixel_spacing=(float(volume.spacing[1]), float(volume.spacing[2])),
        edges=edges,
        auto_window=_auto_window(volume.voxels),
    )


def _slot(files: JobFiles) -> tuple[int, str]:
    return (files.job_id, files.series_uid)


class StackCache:
    """The last ``size`` stacks loaded, per job and series; a re-run (new results) loads
    afresh."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._stacks: OrderedDict[tuple[int, str], ViewerStack] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, str], threading.Lock] = {}

    def get(
        self, files: JobFiles, load: Callable[[JobFiles], ViewerStack] = load_stack
    ) -> ViewerStack:
        with self._lock:
            stack = self._cached(files)
            if stack is not None:
                return stack
            gate = self._loading.setdefault(_slot(files), threading.Lock())
        with gate:  # one load per job at a time: the slice requests of one page wait for it
            with self._lock:
                stack = self._cached(files)
            if stack is None:
                stack = load(files)
                with self._lock:
                    self._stacks[_slot(files)] = stack
                    self._stacks.move_to_end(_slot(files))
                    while len(self._stacks) > self.size:
                        self._stacks.popitem(last=False)
            with self._lock:
                self._loading.pop(_slot(files), None)
        return stack

    def _cached(self, files: JobFiles) -> ViewerStack | None:
        stack = self._stacks.get(_slot(files))
        if stack is None or stack.key != files.key:
            return None
        self._stacks.move_to_end(_slot(files))
        return stack


@dataclass(frozen=True, slots=True)
class MeasurementLine:
    name: str
    value: str
    unit: str


@dataclass(frozen=True, slots=True)
class MeasuredFinding:
    """One TID 1411 group of the stored SR: a structure, where, and its measurements."""

    label: str
    site: str
    measurements: tuple[MeasurementLine, ...]


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _name(measurement: Any) -> str:
    name = str(measurement.name.meaning)
    derivation = measurement.derivation
    return name if derivation is None else f"{name} ({str(derivation.meaning).lower()})"


_UNIT_SYMBOLS = {"1": "", "[hnsf'U]": "HU"}  # UCUM codes shown otherwise than as written


def _unit(unit: Any) -> str:
    text = str(unit.value)
    if text in _UNIT_SYMBOLS:
        return _UNIT_SYMBOLS[text]
    return str(unit.meaning) if "[" in text or "{" in text else text


def findings(files: JobFiles) -> list[MeasuredFinding]:
    """The measurements of the job's stored TID 1500 SR(s), group by group."""
    import highdicom as hd

    found = []
    for path in files.of_series(OutputKind.SR):
        content: Any = hd.sr.srread(path).content  # a TID 1500 MeasurementReport
        for group in content.get_volumetric_roi_measurement_groups():
            label = str(group.tracking_identifier).split(" (label")[0]
            sites = []
            for site in group.finding_sites:
                text = str(site.value.meaning)
                if site.laterality is not None:
                    text = f"{site.laterality.meaning} {text}"
                sites.append(text)
            lines = tuple(
                MeasurementLine(_name(m), _number(float(m.value)), _unit(m.unit))
                for m in group.get_measurements()
            )
            found.append(MeasuredFinding(label, ", ".join(sites), lines))
    return found


def report_pdf(files: JobFiles) -> bytes:
    """The PDF summary the job stored (inside its Encapsulated PDF instance)."""
    from pydicom import dcmread

    for path in files.of_series(OutputKind.PDF):
        ds = dcmread(path)
        data = bytes(ds.EncapsulatedDocument)
        length = ds.get("EncapsulatedDocumentLength")
        return data[: int(length)] if length else data.rstrip(b"\0")
    raise NoSuchResult(f"job {files.job_id} stored no PDF")
