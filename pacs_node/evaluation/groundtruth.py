"""Labelled cases for evaluation, read from what hospitals and challenges have.

- DICOM: ``DATA/<case>/`` holds one image series and a DICOM-SEG (any producer) whose frames
  reference the images. Segments are named by SegmentLabel (or the map's names).
- NIfTI in the Medical Segmentation Decathlon layout: ``DATA/imagesTs/<f>`` and
  ``DATA/labelsTs/<f>`` with the same file names; label values are named by a JSON map
  (``{"liver": 1, ...}``), else by ``DATA/dataset.json`` ``labels``.

Each case becomes a :class:`Volume` (the runner's input, exact geometry) and one boolean mask
per named structure on that Volume's grid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from pacs_node.errors import PacsNodeError
from pacs_node.imaging.volume import Volume, VolumeKind, load_series
from pacs_node.inference.registry import normalise_label
from pacs_node.inference.runner import volume_grid_from_ras_xyz

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class EvaluationDataError(PacsNodeError):
    """The evaluation folder does not hold labelled cases in a layout we read."""


@dataclass(frozen=True)
class TruthCase:
    case_id: str
    volume: Volume
    masks: dict[str, NDArray[np.bool_]]  # vocabulary name -> mask on the volume's grid


def _name_map(label_map: Mapping[str, int] | None) -> dict[int, str] | None:
    if label_map is None:
        return None
    return {int(v): normalise_label(k) for k, v in label_map.items()}


def volume_from_nifti(path: Path, modality: str) -> Volume:
    """A Volume (z, y, x; LPS) from a NIfTI file, geometry from its affine."""
    import nibabel as nib

    img: Any = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise EvaluationDataError(f"{path}: expected a 3D image, got shape {data.shape}")
    grid = volume_grid_from_ras_xyz(np.asarray(img.affine, dtype=np.float64), data.shape)
    linear = grid.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)  # z, y, x
    direction = np.stack([linear[:, 2], linear[:, 1], linear[:, 0]], axis=1) / spacing[::-1]
    voxels = np.ascontiguousarray(data.transpose(2, 1, 0))
    if not np.issubdtype(voxels.dtype, np.integer):
        voxels = voxels.astype(np.float32)
    nz = voxels.shape[0]
    return Volume(
        voxels=voxels,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin=(float(grid.affine[0, 3]), float(grid.affine[1, 3]), float(grid.affine[2, 3])),
        direction=direction,
        sop_instance_uids=("",) * nz,
        frame_numbers=(None,) * nz,
        headers=(),
        modality=modality,
        kind=VolumeKind.IMAGE
        if nz == 1 and modality in ("DX", "CR", "MG", "US")
        else VolumeKind.SERIES,
    )


def _nifti_labels(path: Path, shape: tuple[int, int, int]) -> NDArray[np.integer]:
    import nibabel as nib

    loaded: Any = nib.load(str(path))
    data = np.asarray(loaded.dataobj)
    if data.ndim == 2:
        data = data[:, :, None]
    labels = np.ascontiguousarray(np.rint(data).astype(np.int32).transpose(2, 1, 0))
    if labels.shape != shape:
        raise EvaluationDataError(f"{path}: labels {labels.shape} do not match the image {shape}")
    return labels


def read_decathlon(
    root: Path, label_map: Mapping[str, int] | None, modality: str | None
) -> Iterator[TruthCase]:
    images, labels = root / "imagesTs", root / "labelsTs"
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    names = _name_map(label_map) or {
        int(k): normalise_label(v) for k, v in meta.get("labels", {}).items() if int(k) != 0
    }
    if not names:
        raise EvaluationDataError(f"{root}: no label names: give a JSON map or dataset.json")
    mod = modality or str(meta.get("modality", {}).get("0", "CT"))
    files = sorted(p for p in images.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise EvaluationDataError(f"{images}: no NIfTI images")
    for image in files:
        truth = labels / image.name
        if not truth.is_file():
            raise EvaluationDataError(f"{truth}: missing label file for {image.name}")
        volume = volume_from_nifti(image, mod)
        values = _nifti_labels(truth, volume.shape)
        masks = {name: values == value for value, name in names.items()}
        yield TruthCase(image.name.split(".nii")[0], volume, masks)


def read_dicom_case(folder: Path, label_map: Mapping[str, int] | None) -> TruthCase:
    """One folder: an image series plus its DICOM-SEG."""
    import highdicom as hd

    images: list[Path] = []
    segs: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (InvalidDicomError, OSError):
            continue
        (segs if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS else images).append(path)
    if len(segs) != 1 or not images:
        raise EvaluationDataError(
            f"{folder}: need one image series and one DICOM-SEG, found {len(images)} images "
            f"and {len(segs)} SEG"
        )
    volume = load_series(images)
    seg = hd.seg.segread(str(segs[0]))
    by_number = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    names = _name_map(label_map)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids),
        segment_numbers=sorted(by_number),
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    masks: dict[str, NDArray[np.bool_]] = {}
    for i, number in enumerate(sorted(by_number)):
        name = names.get(number, by_number[number]) if names else by_number[number]
        masks[normalise_label(name)] = np.asarray(pixels[..., i] > 0)
    return TruthCase(folder.name, volume, masks)


def read_cases(
    data: Path, label_map: Mapping[str, int] | None = None, modality: str | None = None
) -> Iterator[TruthCase]:
    """Every labelled case under ``data`` (Decathlon layout when imagesTs/ exists)."""
    if (data / "imagesTs").is_dir():
        yield from read_decathlon(data, label_map, modality)
        return
    folders = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if not folders:
        raise EvaluationDataError(f"{data}: neither imagesTs/ nor case folders with DICOM-SEG")
    for folder in folders:
        yield read_dicom_case(folder, label_map)
