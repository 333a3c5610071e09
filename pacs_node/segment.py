"""``pacs-node segment``: one model on one DICOM series from disk, with no node running.

Pure pipeline (paths in, files out): find the series among the given files and folders, load
it as a Volume, run the model, write ``labels.nii.gz`` (the labels on the source grid, a NIfTI
with the RAS affine of the Volume, array order x, y, z as dcm2niix and MONAI write) and
``labels.json`` (``{"1": "liver", ...}``, vocabulary names, background left out, and under
``"quality"`` the quality gate's verdict with the model's default limits: ``{"verdict": "pass"
| "fail", "failures": [{check, label, value, limit, message}]}``), and then the result objects
as the node would send them (:func:`pacs_node.results.build_results`), so a result can be
inspected without a PACS. ``segment`` sends nothing, so it holds nothing back: every output is
written whatever the verdict::

    DIR/dicom/seg.dcm, sr.dcm, gsps.dcm, key-image-NN.dcm, pdf.dcm   what goes to the PACS
    DIR/alternates/seg-jpeg2000.dcm                                  the optional JPEG 2000 SEG
    DIR/report.pdf                                                   the one-page summary
    DIR/fhir-bundle.json                                             the FHIR transaction Bundle

``dicom/`` is replaced as a whole, so a re-run that finds less leaves no stale objects.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from pacs_node.errors import SeriesChoiceError
from pacs_node.imaging.volume import Volume
from pacs_node.inference.anatomy import PATIENT_ADDED
from pacs_node.inference.labelmap import Labelmap
from pacs_node.inference.runner import Runner, Segmentation, ras_xyz_affine
from pacs_node.pipeline import BUILD, Gate, run_series
from pacs_node.quality.checks import Verdict
from pacs_node.results import OutputKind, ResultOptions, ResultSet

LABELS_NIFTI = "labels.nii.gz"
LABELS_JSON = "labels.json"
DICOM_DIR = "dicom"
ALTERNATES_DIR = "alternates"
REPORT_PDF = "report.pdf"
FHIR_BUNDLE = "fhir-bundle.json"
FILE_STEMS: dict[OutputKind, str] = {  # in this order, key images numbered from 01
    OutputKind.SEG: "seg",
    OutputKind.SR: "sr",
    OutputKind.GSPS: "gsps",
    OutputKind.KEY_IMAGES: "key-image",
    OutputKind.PDF: "pdf",
    OutputKind.SEG_JPEG2000: "seg-jpeg2000",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SegmentReport:
    """What ``segment`` did: the files it wrote and the run behind them."""

    series_instance_uid: str
    nifti: Path
    labels_json: Path
    segmentation: Segmentation
    voxels: dict[str, int]
    results: tuple[Path, ...] = ()  # result files written, empty with results skipped
    notes: tuple[str, ...] = ()
    verdict: Verdict = field(default_factory=Verdict)  # the gate's, with the model's limits

    def as_json(self) -> dict[str, object]:
        names = {spec.value: spec.name for spec in self.segmentation.labelmap.segments}
        return {
            "series_instance_uid": self.series_instance_uid,
            "model": self.segmentation.model.algorithm.name,
            "version": self.segmentation.model.algorithm.version,
            "device": self.segmentation.device,
            "nifti": str(self.nifti),
            "labels_json": str(self.labels_json),
            "voxels": self.voxels,
            "results": [str(path) for path in self.results],
            "notes": list(self.notes),
            "quality": self.verdict.as_json(),
            "removed": self._changes(names, added=False),
            "added": self._changes(names, added=True),
            "timings": self.segmentation.timings.as_json(),
        }

    def _changes(self, names: dict[int, str], *, added: bool) -> list[dict[str, object]]:
        """The anatomical rules' removals, or the one rule's additions, for ``--json``."""
        return [
            {
                "label": names.get(r.value, str(r.value)),
                "rule": r.rule,
                "voxels": r.voxels,
                "ml": r.ml,
            }
            for r in self.segmentation.removals
            if (r.rule == PATIENT_ADDED) == added
        ]


def _files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise SeriesChoiceError(f"{path}: no such file or folder")
    return found


def group_series(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """DICOM files by SeriesInstanceUID, reading headers only; other files are skipped."""
    groups: dict[str, list[Path]] = {}
    for path in _files(paths):
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if uid:
            groups.setdefault(uid, []).append(path)
    return groups


def choose_series(groups: dict[str, list[Path]], series_uid: str | None) -> tuple[str, list[Path]]:
    """The one series to segment, or a :class:`SeriesChoiceError` listing the choices."""
    if not groups:
        raise SeriesChoiceError("no DICOM images found in the given paths")
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesChoiceError(
                f"series {series_uid} is not among the {len(groups)} found: " + ", ".join(groups)
            )
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in groups.items())
        raise SeriesChoiceError(f"{len(groups)} series found, choose one with --series: {listing}")
    uid, files = next(iter(groups.items()))
    return uid, files


def write_labels(
    volume: Volume, labelmap: Labelmap, out_dir: Path, verdict: Verdict | None = None
) -> tuple[Path, Path]:
    """``labels.nii.gz`` on the Volume's grid and ``labels.json`` (with the gate's verdict
    under ``"quality"`` when given), written atomically."""
    import nibabel

    nib: Any = nibabel  # nibabel's annotations are partial

    out_dir.mkdir(parents=True, exist_ok=True)
    top = max((s.value for s in labelmap.segments), default=0)
    dtype = np.uint8 if top < 256 else np.uint16
    data = np.ascontiguousarray(labelmap.labels.astype(dtype).transpose(2, 1, 0))
    image = nib.Nifti1Image(data, ras_xyz_affine(volume.grid))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)  # scanner-based coordinates
    image.set_sform(image.affine, code=1)
    nifti = out_dir / LABELS_NIFTI
    tmp = out_dir / f".{LABELS_NIFTI}.tmp.nii.gz"
    nib.save(image, tmp)
    os.replace(tmp, nifti)
    names: dict[str, Any] = {
        str(s.value): s.name for s in sorted(labelmap.segments, key=lambda s: s.value)
    }
    if verdict is not None:
        names["quality"] = verdict.as_json()
    labels_json = out_dir / LABELS_JSON
    tmp_json = out_dir / f".{LABELS_JSON}.tmp"
    tmp_json.write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_json, labels_json)
    return nifti, labels_json


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _replace_dir(staged: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)


def write_results(results: ResultSet, out_dir: Path) -> list[Path]:
    """The result objects as files (layout in the module docstring), each object's bytes as
    built; returns the paths written, DICOM first."""
    written: list[Path] = []
    for folder, objects in ((DICOM_DIR, results.dicom), (ALTERNATES_DIR, results.alternates)):
        target = out_dir / folder
        staged = out_dir / f".{folder}.tmp"
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        paths: list[Path] = []
        for kind, stem in FILE_STEMS.items():
            of_kind = [o for o in objects if o.kind is kind]
            for index, stored in enumerate(of_kind, start=1):
                suffix = f"-{index:02d}" if kind is OutputKind.KEY_IMAGES else ""
                name = f"{stem}{suffix}.dcm"
                (staged / name).write_bytes(stored.data)
                paths.append(target / name)
        if paths:
            _replace_dir(staged, target)
        else:
            shutil.rmtree(staged)
            if target.exists():
                shutil.rmtree(target)
        written.extend(paths)
    for name, data in ((REPORT_PDF, results.pdf), (FHIR_BUNDLE, results.fhir_bundle)):
        if data:
            _write_atomic(out_dir / name, data)
            written.append(out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)
    return written


def segment_paths(
    runner: Runner,
    model: str,
    paths: Sequence[Path],
    out_dir: Path,
    *,
    series_uid: str | None = None,
    progress: Progress | None = None,
    results: ResultOptions | None = None,
) -> SegmentReport:
    """Find the series, check the model takes it, run it and write the labels, then (unless
    ``results`` is None) build the result objects once and write them too."""
    step = progress or (lambda _stage: None)
    bundle = runner.registry.get(model)  # an unknown model fails before any decoding
    step("read")
    uid, files = choose_series(group_series(paths), series_uid)

    def on_stage(stage: str) -> None:
        if stage == BUILD:
            step("write")
            if results is not None:
                step("results")

    run = run_series(
        runner,
        bundle.name,
        uid,
        files,
        results,
        gate=Gate(flag=results.quality_flag if results is not None else False),
        on_stage=on_stage,
        progress=step,
    )
    result = run.segmentation
    counts = np.bincount(result.labelmap.labels.ravel().astype(np.int64))
    voxels = {
        s.name: int(counts[s.value]) if s.value < counts.size else 0
        for s in result.labelmap.segments
    }
    removed = tuple(result.notes)  # what the model's anatomical rules took away
    verdict = run.verdict or Verdict()
    nifti, labels_json = write_labels(run.volume, result.labelmap, out_dir, verdict)
    if run.results is None:
        return SegmentReport(
            uid, nifti, labels_json, result, voxels, notes=removed, verdict=verdict
        )
    written = write_results(run.results, out_dir)
    return SegmentReport(
        uid,
        nifti,
        labels_json,
        result,
        voxels,
        tuple(written),
        removed + run.results.notes,
        verdict,
    )
