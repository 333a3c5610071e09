"""Synthetic, dciodvfy-clean DICOM series for tests: CT and MR with consistent geometry, and the
studies that show how the shipped routes read a body region."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
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


def restyle(paths: list[Path], **attributes: object) -> list[Path]:
    """Set attributes on every file of a series; ``None`` removes one."""
    for path in paths:
        ds = dcmread(path)
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


_NO_DESCRIPTIONS = {"BodyPartExamined": None, "SeriesDescription": None, "StudyDescription": None}
# (name, modality, slices, (dz, dy, dx) spacing, attributes); 64 x 64 pixels: the field is 64 dx.
# Each is one study for the shipped routes (ae_config/routes.yaml).
ROUTING_CASES: list[tuple[str, str, int, tuple[float, float, float], dict[str, object]]] = [
    ("ct-without-series-description", "CT", 20, (3.0, 1.0, 1.0), {"SeriesDescription": None}),
    ("ct-thorax-description", "CT", 20, (3.0, 1.0, 1.0), {
        **_NO_DESCRIPTIONS, "SeriesDescription": "CT THORAX"
    }),
    ("ct-torso-geometry", "CT", 20, (5.0, 6.0, 6.0), _NO_DESCRIPTIONS),  # field 384 mm
    ("ct-head-body-part", "CT", 20, (3.0, 1.0, 1.0), {"BodyPartExamined": "HEAD"}),
    ("ct-head-geometry", "CT", 20, (5.0, 3.6, 3.6), _NO_DESCRIPTIONS),  # 100 mm, field 230 mm
    ("mr-abdomen", "MR", 20, (3.0, 1.0, 1.0), {"BodyPartExamined": "ABDOMEN"}),
    ("mr-liver-description", "MR", 20, (3.0, 1.0, 1.0), {
        **_NO_DESCRIPTIONS, "SeriesDescription": "t1_vibe_fs_tra_Leber"
    }),
    ("mr-head", "MR", 20, (3.0, 1.0, 1.0), {"BodyPartExamined": "HEAD"}),
    ("mr-torso-geometry", "MR", 20, (5.0, 6.0, 6.0), _NO_DESCRIPTIONS),  # size alone: not for MR
]  # fmt: skip

# What the shipped routes do with each case: (rule, model), or None for unrouted.
ROUTING_EXPECTED: dict[str, tuple[str, str] | None] = {
    "ct-without-series-description": ("ct-body", "ct-torso-organs"),
    "ct-thorax-description": ("ct-body", "ct-torso-organs"),
    "ct-torso-geometry": ("ct-body", "ct-torso-organs"),
    "ct-head-body-part": None,
    "ct-head-geometry": None,
    "mr-abdomen": ("mr-body", "mr-torso-organs"),
    "mr-liver-description": ("mr-body", "mr-torso-organs"),
    "mr-head": None,
    "mr-torso-geometry": None,
}


def write_routing_cases(root: Path, only: Sequence[str] = ()) -> dict[str, str]:
    """One study per routing case (or those named) under ``root/<name>``; case name -> Study
    Instance UID."""
    studies = {}
    for name, modality, slices, spacing, attributes in ROUTING_CASES:
        if only and name not in only:
            continue
        study = new_uid()
        paths = write_series(
            root / name, modality=modality, slices=slices, study_uid=study, spacing=spacing
        )
        restyle(paths, **attributes)
        studies[name] = study
    return studies


def write_requested_ct(directory: Path) -> list[Path]:
    """A torso CT series (40 slices) whose region is known from its request only, as a RIS
    fills it: Request Attributes with descriptions and a procedure code, a protocol name."""
    study = new_uid()
    paths = write_series(directory, slices=40, study_uid=study, spacing=(2.0, 0.8, 0.8))
    request = Dataset()
    request.RequestedProcedureDescription = "CT Thorax Abdomen"
    request.ScheduledProcedureStepDescription = "CT TAP w/ contrast"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "RPID17", "LN"
    code.CodeMeaning = "CT CHEST ABDOMEN PELVIS"
    request.RequestedProcedureCodeSequence = [code]
    return restyle(
        paths,
        BodyPartExamined=None,
        Laterality="",  # type 2C: present, and empty, once no body part is named
        SeriesDescription=None,
        StudyDescription=None,
        ProtocolName="Routine 2.0",
        RequestAttributesSequence=[request],
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"],
    )


def write_enhanced_mr(directory: Path) -> list[Path]:
    """pydicom's Enhanced MR example (one instance of 10 frames) with its geometry in the
    functional groups, as an enhanced IOD holds it: orientation (coronal) and pixel measures
    (12 mm slices) shared, positions per frame. Read for its header only: like the example, it
    lacks most of the IOD's other functional groups, so it is no dciodvfy-clean object."""
    source = get_testdata_file("emri_small.dcm")
    assert source is not None
    ds = dcmread(source)
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    measures.PixelSpacing = [3.2, 3.2]
    measures.SliceThickness = 12.0
    measures.SpacingBetweenSlices = 12.0
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for index in range(int(ds.NumberOfFrames)):
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [-100.0, -50.0 + 12.0 * index, 100.0]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    directory.mkdir(parents=True)
    path = directory / "emri.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]
