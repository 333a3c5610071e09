"""A rendered case on disk: a DICOM series (CT, MR or DX images with valid patient geometry,
readable by :func:`pacs_node.imaging.volume.load_series`) or a NIfTI image/label pair in the
Medical Segmentation Decathlon layout (imagesTr/labelsTr/imagesTs/labelsTs + dataset.json)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib  # type: ignore[import-untyped,unused-ignore]
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from phantom.render import Case

_SOP = {"CT": CTImageStorage, "MR": MRImageStorage, "DX": DigitalXRayImageStorageForPresentation}
_PREFIX = "1.2.826.0.1.3680043.10.1082."  # UIDs derived from the seed: rewrites are identical


def _uid(case: Case, *parts: object) -> str:
    return generate_uid(_PREFIX, [case.modality, str(case.seed), *map(str, parts)])


def _values(case: Case) -> NDArray[np.integer]:
    """The image as integers, higher brighter (what a loader gives back): CT int16 HU, MR/DX
    uint16 (a radiograph within its stored bits)."""
    if case.modality == "CT":
        return np.clip(np.rint(case.image), -1024, 3071).astype(np.int16)
    top = 2 ** int(case.settings.get("bits", 12)) - 1 if case.modality == "DX" else 65535
    return np.clip(np.rint(case.image), 0, top).astype(np.uint16)


def _stored(case: Case) -> tuple[NDArray[np.integer], float]:
    """Stored pixel values and the rescale intercept: a MONOCHROME1 radiograph (minimum white)
    stores them inverted within its bits, so a reader's inversion gives the image back."""
    values = _values(case)
    if case.modality == "DX" and case.settings.get("photometric") == "MONOCHROME1":
        top = 2 ** int(case.settings.get("bits", 12)) - 1
        return (top - values).astype(np.uint16), 0.0
    return values, 0.0


def dicom_datasets(case: Case) -> Iterable[Dataset]:
    """One Dataset per slice (one for a radiograph), with the patient geometry of ``case``."""
    pixels, intercept = _stored(case)
    study, series = _uid(case, "study"), _uid(case, "series")
    frame = _uid(case, "frame")
    dz, dy, dx = case.spacing
    for k in range(pixels.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = _SOP[case.modality]
        ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(case, "image", k))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = _SOP[case.modality]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName = f"PHANTOM^{case.seed}"
        ds.PatientID = f"PHANTOM-{case.seed}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = case.modality
        ds.Manufacturer = "pacs-node phantom"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = f"phantom {case.modality} seed {case.seed}"
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        if case.modality == "DX":
            bits = int(case.settings.get("bits", 12))
            ds.BitsStored, ds.HighBit = bits, bits - 1
            photometric = str(case.settings.get("photometric", "MONOCHROME2"))
            ds.PhotometricInterpretation = photometric
            spacing = case.settings.get("spacing", "known")
            if spacing == "known":
                ds.ImagerPixelSpacing = ds.PixelSpacing = [dy, dx]
            else:  # a CR reader that wrote no usable spacing (zero, as RG1, or none)
                ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
                ds.SOPClassUID = ComputedRadiographyImageStorage
                ds.Modality = "CR"
                if spacing == "zero":
                    ds.PixelSpacing = [0, 0]
            ds.PatientOrientation = ["L", "F"]
            ds.ViewPosition = str(case.settings.get("view", "PA"))
            ds.BodyPartExamined = "CHEST"
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
            if ds.Modality == "DX":  # DX Image: the shape follows the photometric
                ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        else:
            ds.BodyPartExamined = "CHESTABDOMEN"  # the torso, as a scanner would tag it
            ds.FrameOfReferenceUID = frame
            ds.PositionReferenceIndicator = ""
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            rows, columns = case.flips
            ds.ImageOrientationPatient = [-1 if columns else 1, 0, 0, 0, -1 if rows else 1, 0]
            z = case.origin[2] + k * dz
            ds.ImagePositionPatient = [case.origin[0], case.origin[1], round(z, 4)]
            ds.SliceLocation = round(z, 4)
            ds.PixelSpacing = [dy, dx]
            ds.SliceThickness = round(dz, 4)
            ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
            ds.RescaleType = "HU" if case.modality == "CT" else "US"
        if case.modality == "CT":
            ds.KVP = 120
        if case.modality == "MR":
            weighting = str(case.settings.get("weighting", "T1"))
            ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
            ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
            ds.EchoTime = 15 if weighting == "T1" else 90
            ds.RepetitionTime = 500 if weighting == "T1" else 3000
            ds.MagneticFieldStrength = 1.5
        yield ds


def write_dicom(case: Case, folder: Path) -> list[Path]:
    """Write the case as one DICOM series (one file per slice) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in dicom_datasets(case):
        path = folder / f"{ds.InstanceNumber:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def nifti_affine(case: Case) -> NDArray[np.float64]:
    """RAS affine of the (x, y, z)-ordered array NIfTI stores."""
    dz, dy, dx = case.spacing
    rows, columns = case.flips
    affine = np.diag([-dx * (-1 if columns else 1), -dy * (-1 if rows else 1), dz, 1.0])
    affine[:3, 3] = [-case.origin[0], -case.origin[1], case.origin[2]]
    return affine


def write_nifti_pair(case: Case, image: Path, labels: Path) -> None:
    """Image (float32, or int16 HU for CT) and labels (uint8) in x, y, z order."""
    affine = nifti_affine(case)
    pixels = _values(case)  # NIfTI has no photometric interpretation: higher is brighter
    for path, array in ((image, pixels), (labels, case.labels)):
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ascontiguousarray(array.transpose(2, 1, 0))
        img = nib.Nifti1Image(data, affine)  # type: ignore[no-untyped-call,unused-ignore]
        img.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call,unused-ignore]
        nib.save(img, str(path))


def write_decathlon(
    root: Path, train: Iterable[Case], test: Iterable[Case], name: str, description: str = ""
) -> Path:
    """A dataset folder in the Decathlon layout with its dataset.json (labels by value)."""
    training: list[dict[str, str]] = []
    testing: list[dict[str, str]] = []
    modality = "CT"
    labels: dict[int, str] = {}
    for subset, cases, entries in (("Tr", train, training), ("Ts", test, testing)):
        for case in cases:
            stem = f"{name}_{case.seed:05d}.nii.gz"
            write_nifti_pair(case, root / f"images{subset}" / stem, root / f"labels{subset}" / stem)
            entries.append(
                {"image": f"./images{subset}/{stem}", "label": f"./labels{subset}/{stem}"}
            )
            modality, labels = case.modality, case.label_names
    dataset = {
        "name": name,
        "description": description or "procedural phantoms (models/phantom)",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "numTraining": len(training),
        "numTest": len(testing),
        "training": training,
        "test": testing,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return root
