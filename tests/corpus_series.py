"""A single image from pydicom's test corpus (a real scan) as a series of identical slices, so
3D models can run on it: each copy gets its own SOP Instance UID and a position one slice
further along the image normal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.dicom_factory import new_uid


def stack_corpus_file(name: str, directory: Path, slices: int, spacing_mm: float) -> list[Path]:
    """``slices`` copies of corpus file ``name`` under ``directory``, ``spacing_mm`` apart."""
    source = get_testdata_file(name)
    if source is None:
        raise FileNotFoundError(name)
    template = dcmread(source)
    orientation = np.array([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    series_uid = new_uid()
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(slices):
        ds = dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + normal * spacing_mm * index]
        ds.SliceThickness = f"{spacing_mm:g}"
        path = directory / f"{index + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
