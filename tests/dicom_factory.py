"""Synthetic, dciodvfy-clean DICOM series for tests: CT and MR with consistent geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
TEST_ROOT = "1.2.826.0.1.3680043.10.1234."


def new_uid() -> str:
    return generate_uid(prefix=TEST_ROOT)


def _base(
    sop_class: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference: str,
    modality: str,
    series_number: int,
    patient_name: str,
    charset: str,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.PatientName = patient_name
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "Synthetic torso"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "pacs-node tests"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    return ds


def write_series(
    directory: Path,
    *,
    modality: str = "CT",
    slices: int = 120,
    rows: int = 64,
    columns: int = 64,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    study_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Axial 2.5mm",
    patient_name: str = "Doe^Jane",
    charset: str = "ISO_IR 192",
    frame_of_reference: str | None = None,
) -> list[Path]:
    """Write one axial series; return the file paths (slice order = instance order)."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or new_uid()
    series_uid = new_uid()
    frame_of_reference = frame_of_reference or new_uid()
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    rng = np.random.default_rng(series_number)
    yy, xx = np.mgrid[0:rows, 0:columns]
    body = ((yy - rows / 2) / (rows * 0.4)) ** 2 + ((xx - columns / 2) / (columns * 0.45)) ** 2 < 1
    paths: list[Path] = []
    for index in range(slices):
        ds = _base(
            sop_class,
            study_uid,
            series_uid,
            frame_of_reference,
            modality,
            series_number,
            patient_name,
            charset,
        )
        ds.SeriesDescription = series_description
        ds.SOPInstanceUID = new_uid()
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        ds.ImagePositionPatient = [
            -columns * spacing[2] / 2,
            -rows * spacing[1] / 2,
            -index * spacing[0],
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if modality == "CT":
            ds.KVP = 120
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            pixels = np.where(body, 1064, 24) + rng.normal(0, 10, (rows, columns))
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = 500
            ds.EchoTime = 15
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
            pixels = np.where(body, 800, 5) + rng.normal(0, 5, (rows, columns))
        ds.PixelData = pixels.astype(np.int16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = directory / f"{modality.lower()}{series_number:02d}_{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_study(directory: Path, series: Sequence[tuple[str, int]], **kwargs: object) -> str:
    """Write several series into one study; ``series`` is (modality, slice count) pairs."""
    study_uid = new_uid()
    frame = new_uid()
    for number, (modality, count) in enumerate(series, start=1):
        write_series(
            directory / f"series{number}",
            modality=modality,
            slices=count,
            study_uid=study_uid,
            series_number=number,
            frame_of_reference=frame,
            **kwargs,  # type: ignore[arg-type]
        )
    return study_uid
