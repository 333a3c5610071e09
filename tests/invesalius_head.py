"""The real head CT that Debian's ``invesalius-examples`` ships (``Cranium.inv3``: 108 axial
slices of 256 x 256, 0.957 x 0.957 x 1.5 mm, with the bone and soft-tissue threshold masks an
InVesalius user drew on it) written as the DICOM series a scanner would send.

An ``.inv3`` file is a gzipped tar of property lists and raw arrays. The volume is int16 HU,
indexed (slice, row, column); slice 0 is the lowest (orbits), and InVesalius keeps the rows
flipped for display (anterior at the last row), so they are flipped back here to the DICOM
convention, rows running towards the patient's back. The masks are one voxel larger on each
axis (the first plane holds InVesalius' bookkeeping) and hold 255 inside.
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.dicom_factory import new_uid

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


@dataclass(frozen=True)
class HeadCT:
    """The written series and the package's own masks, on the same (slice, row, column) grid."""

    paths: list[Path]
    hu: NDArray[np.int16]
    spacing: tuple[float, float, float]  # slice, row, column (mm)
    bone: NDArray[np.bool_]  # the package's bone mask (drawn at 226 HU and above)
    tissue: NDArray[np.bool_]  # its soft-tissue mask (-142 HU and above): head and head rest


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        out: dict[str, bytes] = {}
        for member in tar.getmembers():
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                out[Path(member.name).name] = handle.read()
        return out


def _mask(files: dict[str, bytes], plist_name: str) -> NDArray[np.bool_]:
    info = plistlib.loads(files[plist_name])
    shape = tuple(int(v) for v in info["mask_shape"])
    raw = np.frombuffer(files[info["mask_file"]], dtype=np.uint8).reshape(shape)
    return np.ascontiguousarray(raw[1:, 1:, 1:][:, ::-1, :] >= 127)


Cranium = tuple[NDArray[np.int16], tuple[float, float, float], NDArray[np.bool_], NDArray[np.bool_]]


def read_cranium(archive: Path = CRANIUM) -> Cranium:
    """HU volume (rows in DICOM order), spacing, bone mask, soft-tissue mask."""
    files = _members(archive)
    main = plistlib.loads(files["main.plist"])
    matrix = main["matrix"]
    shape = tuple(int(v) for v in matrix["shape"])
    hu = np.frombuffer(files[matrix["filename"]], dtype=matrix["dtype"]).reshape(shape)
    sx, sy, sz = (float(v) for v in main["spacing"])
    masks = {plistlib.loads(files[name])["threshold_range"][0]: name
             for name in main["masks"].values()}  # fmt: skip
    bone, tissue = (_mask(files, masks[t]) for t in sorted(masks, reverse=True))
    return np.ascontiguousarray(hu[:, ::-1, :]), (sz, sy, sx), bone, tissue


def write_head_ct(directory: Path, archive: Path = CRANIUM) -> HeadCT:
    """The volume as one axial CT series, with only what a scanner writes about a head CT
    without a Body Part Examined (many do not fill it), so routing must judge by size."""
    hu, spacing, bone, tissue = read_cranium(archive)
    directory.mkdir(parents=True, exist_ok=True)
    study, series, frame = new_uid(), new_uid(), new_uid()
    dz, dy, dx = spacing
    nz, ny, nx = hu.shape
    origin = (-(nx - 1) * dx / 2, -(ny - 1) * dy / 2, -80.0)
    paths: list[Path] = []
    for k in range(nz):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = new_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "Cranium^ProMED", "PROMED0051"
        ds.StudyDescription, ds.SeriesDescription = "CT", "Axial 1.5"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20120914", "151208", "INV0051"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * dz]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = hu[k].astype("<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = directory / f"{k + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return HeadCT(paths, hu, spacing, bone, tissue)
