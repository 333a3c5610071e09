"""Synthetic studies for the results tests: a source series as pydicom datasets -> load_series,
with phantoms of known geometry (a ball, a box) and a Labelmap on the same grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray
from phantom.render import TRAINING, render
from phantom.writers import dicom_datasets
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
)

from pacs_node.imaging import Volume, load_series
from pacs_node.inference.labelmap import Algorithm, Labelmap, ModelInfo, SegmentSpec
from pacs_node.inference.vocabulary import structure
from tests.dicom_factory import new_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_orientation(degrees: float = 25.0) -> tuple[float, ...]:
    """Axial rotated about S, then tipped about the row axis: a proper oblique plane."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col0 = np.array([-np.sin(a), np.cos(a), 0.0])
    normal0 = np.cross(row, col0)
    col = np.cos(b) * col0 + np.sin(b) * normal0
    return (*row.round(10), *col.round(10))


def make_series(
    stored: NDArray[np.int16],
    *,
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    orientation: Sequence[float] = AXIAL,
    modality: str = "CT",
    patient_name: str = "Doe^Jane",
    charset: str = "ISO_IR 192",
    study_uid: str | None = None,
    issuer: str | None = "HOSP-A",
    window: bool = True,
) -> list[Dataset]:
    """Single-frame source images whose pixel ``stored[z]`` lies at slice z of the volume."""
    study_uid = study_uid or new_uid()
    series_uid, frame_uid = new_uid(), new_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    slices, rows, cols = stored.shape
    centre = np.array([-5.0, 12.0, 30.0])
    origin = centre - row * cols * spacing[2] / 2 - col * rows * spacing[1] / 2
    out: list[Dataset] = []
    for z in range(slices):
        ds = Dataset()
        ds.SpecificCharacterSet = charset
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = new_uid()
        ds.PatientName = patient_name
        ds.PatientID = "PID-4711"
        if issuer:
            ds.IssuerOfPatientID = issuer
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.StudyTime = "101500"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "S1"
        ds.AccessionNumber = "ACC-77"
        ds.StudyDescription = "Synthetic phantom"
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.SeriesDescription = "Phantom"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "pacs-node tests"
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20260101"
        ds.ContentTime = "101500"
        ds.ImagePositionPatient = [float(v) for v in origin + normal * z * spacing[0]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if modality == "CT":
            ds.KVP = 120
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = 500
            ds.EchoTime = 15
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
        if window:
            ds.WindowCenter = 40
            ds.WindowWidth = 400
        ds.PixelData = np.ascontiguousarray(stored[z], dtype=np.int16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def ball(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    radius_mm: float,
    centre_mm: tuple[float, float, float] | None = None,
) -> NDArray[np.bool_]:
    """Voxels whose centre lies inside a ball (array-space mm, centre default = grid centre)."""
    grids = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    zz, yy, xx = np.meshgrid(*grids, indexing="ij")
    c = centre_mm or tuple((n - 1) * s / 2 for n, s in zip(shape, spacing, strict=True))
    return np.asarray((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius_mm**2)


def box(
    shape: tuple[int, int, int], start: tuple[int, int, int], size: tuple[int, int, int]
) -> NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
    return mask


def phantom_study(
    *,
    shape: tuple[int, int, int] = (24, 48, 48),
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    orientation: Sequence[float] = AXIAL,
    modality: str = "CT",
    patient_name: str = "Doe^Jane",
    charset: str = "ISO_IR 192",
) -> tuple[Volume, Labelmap, ModelInfo]:
    """A ball ("liver", label 1) and a box ("kidney_left", label 3) in a noisy CT-like volume."""
    rng = np.random.default_rng(7)
    liver = ball(shape, spacing, radius_mm=12.0, centre_mm=(22.0, 24.0, 16.0))
    kidney = box(shape, (4, 10, 30), (6, 14, 10))
    stored = rng.normal(-50, 5, shape)
    stored[liver] = rng.normal(60, 8, int(liver.sum()))
    stored[kidney] = rng.normal(30, 4, int(kidney.sum()))
    datasets = make_series(
        stored.round().astype(np.int16),
        spacing=spacing,
        orientation=orientation,
        modality=modality,
        patient_name=patient_name,
        charset=charset,
    )
    volume = load_series(datasets)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[liver] = 1
    labels[kidney] = 3
    segments = (
        SegmentSpec(1, structure("liver")),
        SegmentSpec(3, structure("kidney_left")),
        SegmentSpec(4, structure("spleen")),  # a label the model knows but did not find
    )
    labelmap = Labelmap(labels=labels, segments=segments)
    info = ModelInfo(
        algorithm=Algorithm(name="phantom-organs", version="1.2.0", description="test model"),
        modalities=(modality,),
        segments=segments,
    )
    return volume, labelmap, info


def torso_study(
    *, one_lung_label: bool = False, kidney_on_wrong_side: bool = False, body_island: bool = False
) -> tuple[Volume, Labelmap, ModelInfo]:
    """A coarse axial torso (10 x 48 x 64 voxels of 4 x 3 x 3 mm, patient left at high column
    indices): body, left and right lung (or one ``lung`` label for both), kidneys, spine and
    heart, each a box or ellipse where anatomy puts it. ``kidney_on_wrong_side`` draws the left
    kidney on the patient's right (a model's left/right swap); ``body_island`` adds a body
    fragment apart from the trunk."""
    shape, spacing = (10, 48, 64), (4.0, 3.0, 3.0)
    _, rows, cols = np.indices(shape)
    trunk = ((rows - 24) / 19) ** 2 + ((cols - 31.5) / 28) ** 2 <= 1
    parts = {
        "lung_left": box(shape, (4, 12, 37), (6, 16, 15)),
        "lung_right": box(shape, (4, 12, 12), (6, 16, 15)),
        "kidney_left": box(shape, (0, 28, 41), (4, 8, 7)),
        "kidney_right": box(shape, (0, 28, 16), (4, 8, 7)),
        "spine": box(shape, (0, 33, 29), (10, 6, 6)),
        "heart": box(shape, (5, 14, 30), (4, 9, 9)),
    }
    if kidney_on_wrong_side:
        parts["kidney_left"], parts["kidney_right"] = parts["kidney_right"], np.zeros(shape, bool)
    names = ["body", "lung", *parts] if one_lung_label else ["body", *parts]
    if one_lung_label:
        parts["lung"] = parts.pop("lung_left") | parts.pop("lung_right")
        names = [n for n in names if n not in ("lung_left", "lung_right")]
    labels = np.zeros(shape, dtype=np.uint8)
    labels[trunk] = 1
    if body_island:
        labels[2:6, 2:5, 2:5] = 1  # outside the trunk's ellipse
    for value, name in enumerate(names[1:], start=2):
        labels[parts[name]] = value
    rng = np.random.default_rng(11)
    stored = np.where(labels > 0, 40, -1000) + rng.normal(0, 5, shape)
    volume = load_series(make_series(stored.round().astype(np.int16), spacing=spacing))
    segments = tuple(SegmentSpec(v, structure(n)) for v, n in enumerate(names, start=1))
    info = ModelInfo(
        algorithm=Algorithm(name="phantom-torso", version="1.0.0", description="test model"),
        modalities=("CT",),
        segments=segments,
    )
    return volume, Labelmap(labels=labels, segments=segments), info


LUNGS = (SegmentSpec(1, structure("lung_left")), SegmentSpec(2, structure("lung_right")))


def radiograph_study(
    *, seed: int = 7001, body_part_thickness_mm: float | None = 210.0
) -> tuple[Volume, Labelmap, ModelInfo]:
    """A phantom PA chest radiograph (DX: no Frame of Reference, Patient Orientation L\\F) and
    its own left and right lung labels, as the xr-chest-lungs model is trained on."""
    case = render("DX", seed, replace(TRAINING, pixel_mm=(2.8, 3.2)))
    (ds,) = dicom_datasets(case)
    if body_part_thickness_mm is not None:
        ds.BodyPartThickness = body_part_thickness_mm
    info = ModelInfo(
        algorithm=Algorithm(name="phantom-lungs", version="1.0.0", description="test model"),
        modalities=("DX",),
        segments=LUNGS,
    )
    return load_series([ds]), Labelmap(case.labels.astype(np.uint8), LUNGS), info


def ultrasound_study() -> tuple[Volume, Labelmap, ModelInfo]:
    """One B-mode ultrasound image (US Image Storage, 8-bit, no Frame of Reference or Pixel
    Spacing; one calibrated region of 0.5 mm pixels) with a "liver" ellipse and a "kidney_left"
    box labelled on it."""
    rows, cols = 96, 128
    labels = np.zeros((1, rows, cols), dtype=np.uint8)
    yy, xx = np.indices((rows, cols))
    labels[0][((yy - 40) / 25) ** 2 + ((xx - 50) / 35) ** 2 <= 1] = 1
    labels[0, 60:85, 90:115] = 3
    pixels = np.where(labels[0] == 1, 120, np.where(labels[0] == 3, 80, 30))
    pixels = pixels + np.random.default_rng(5).integers(0, 20, (rows, cols))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = new_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Doe^Jane",
        "PID-4711",
        "",
        "",
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "101500", ""
    ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "S1", "ACC-78", "Abdomen ultrasound"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Manufacturer, ds.PatientOrientation = "pacs-node tests", ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.ContentDate, ds.ContentTime = "20260101", "101500"
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.05
    ds.SequenceOfUltrasoundRegions = [region]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    segments = (SegmentSpec(1, structure("liver")), SegmentSpec(3, structure("kidney_left")))
    info = ModelInfo(
        algorithm=Algorithm(name="phantom-us", version="1.0.0", description="test model"),
        modalities=("US",),
        segments=segments,
    )
    return load_series([ds]), Labelmap(labels=labels, segments=segments), info
