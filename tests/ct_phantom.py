"""A small synthetic chest CT with known anatomy, for testing classical localisation.

Ellipsoid torso (fat layer over muscle), two lungs with vessels, heart, trachea and main
bronchi, a spine (vertebral bodies with cortex and marrow, discs, canal, arches, spinous
processes), ribs with cortex and marrow, and a patient table (carbon skins around foam, under a
foam mattress). Rendered with sub-voxel sampling so edge voxels carry true partial volume, then
blurred (scanner PSF) and given noise. Truth masks are the voxels at least half inside each
structure. Patient LPS: x to the patient's left, y posterior, z superior; image rows run along
+y, columns along +x, so the left lung is on the image's right as on a scanner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from tests.dicom_factory import CT_IMAGE, new_uid

AIR, FAT, SOFT, LUNG, BLOOD, CSF, DISC, MARROW, CORTEX, MATTRESS, FOAM, CARBON = range(12)
HU = np.array([-1000, -100, 40, -850, 45, 15, 80, 220, 900, -760, -950, 350], dtype=np.float32)
TRUTH = ("body", "lung_left", "lung_right", "bone")


@dataclass(frozen=True)
class Phantom:
    hu: NDArray[np.int16]  # (z, y, x)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float, float]  # LPS of voxel [0, 0, 0]
    truth: dict[str, NDArray[np.bool_]]


def _paint(
    x: NDArray[np.float32],
    y: NDArray[np.float32],
    z: NDArray[np.float32],
    rng_params: dict[str, float],
) -> tuple[NDArray[np.int8], dict[str, NDArray[np.bool_]]]:
    """Tissue index and truth membership at sample points (x, y, z in mm)."""
    p = rng_params
    tissue = np.full(x.shape, AIR, dtype=np.int8)
    a, b = p["a"], p["b"]
    skin = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    fat_t = p["fat"]
    muscle = (x / (a - fat_t)) ** 2 + (y / (b - fat_t)) ** 2 <= 1.0
    # table: mattress then carbon/foam/carbon, below (posterior to) the body
    top = b + p["gap"]
    mattress = (y > b - 5) & (y <= top) & (np.abs(x) < 220) & ~skin
    table = (y > top) & (y <= top + 40) & (np.abs(x) < 230)
    tissue[mattress] = MATTRESS
    tissue[table] = FOAM
    tissue[table & ((y <= top + 2.5) | (y > top + 37.5))] = CARBON
    tissue[skin] = FAT
    tissue[muscle] = SOFT
    # lungs: ellipsoids beside the mediastinum
    lungs = {}
    zc, zr = p["lung_z"], p["lung_zr"]
    for side, sign in (("lung_left", 1.0), ("lung_right", -1.0)):
        cx = sign * p["lung_x"]
        inside = ((x - cx) / p["lung_a"]) ** 2 + ((y + 5) / p["lung_b"]) ** 2 + (
            (z - zc) / zr
        ) ** 2 <= 1.0
        inside &= sign * x > 22.0  # mediastinum
        lungs[side] = inside
        tissue[inside] = LUNG
    heart = ((x - 25) / 60) ** 2 + ((y + 35) / 50) ** 2 + ((z - (zc - 0.55 * zr)) / 55) ** 2 <= 1
    for side in lungs:
        lungs[side] &= ~heart
    tissue[heart] = BLOOD
    # vessels inside the lungs (part of the lung truth)
    for k in range(6):
        vx = (-1) ** k * (p["lung_x"] + 12 * ((k % 3) - 1))
        vessel = ((x - vx) ** 2 + (y + 5 - 15 * ((k % 2) - 0.5)) ** 2 <= 16) & (
            np.abs(z - zc) < 0.6 * zr
        )
        tissue[vessel & (lungs["lung_left"] | lungs["lung_right"])] = BLOOD
    # trachea down to the carina, main bronchi out to each lung (air; not lung)
    carina = zc + 0.15 * zr
    airway = (x**2 + (y + 20) ** 2 <= 81) & (z >= carina) & muscle
    for sign in (1.0, -1.0):
        t = np.clip((carina - z) / 30.0, 0.0, 1.0)
        bx = sign * (t * p["lung_x"] * 0.6)
        bronchus = ((x - bx) ** 2 + (y + 20) ** 2 <= 36) & (z < carina) & (z > carina - 30)
        airway |= bronchus
    tissue[airway] = AIR
    for side in lungs:
        lungs[side] &= ~airway
    # spine: vertebral bodies with discs, canal, arch and spinous process
    sy = b - fat_t - 75
    level = np.mod(z - p["spine_phase"], 30.0)
    disc = level < 6.0
    body_r = ((x / 20) ** 2 + ((y - sy) / 16) ** 2) ** 0.5
    vertebra = (body_r <= 1.0) & ~disc
    canal_r = (x**2 + (y - sy - 27) ** 2) ** 0.5
    arch = (canal_r > 8.0) & (canal_r <= 13.0) & (y > sy + 12) & ~disc
    spinous = (np.abs(x) <= 4) & (y > sy + 38) & (y < sy + 60) & ~disc
    tissue[(body_r <= 1.0) & disc] = DISC
    tissue[canal_r <= 8.0] = CSF
    tissue[vertebra] = CORTEX
    tissue[vertebra & (body_r <= 1.0 - 1.5 / 16)] = MARROW
    tissue[arch | spinous] = CORTEX
    bone = vertebra | arch | spinous
    # ribs: tubes along an ellipse just inside the muscle wall, slanting down anteriorly
    ra, rb = a - fat_t - 14, b - fat_t - 14
    d = np.sqrt((x / ra) ** 2 + (y / rb) ** 2)
    radial = (d - 1.0) * 0.5 * (ra + rb)
    posterior = y > -0.55 * rb
    z_low, z_high = float(z.min()) - 10.0, float(z.max()) + 0.12 * 2 * rb + 10.0
    for rib_z in np.arange(p["rib_phase"], 400.0, 26.0):
        if not z_low <= rib_z <= z_high:
            continue
        zr_off = z - (rib_z - 0.12 * (rb - y))
        dist = np.sqrt(radial**2 + zr_off**2)
        rib = (dist <= 5.0) & posterior & (np.abs(x) > 25)
        tissue[rib] = CORTEX
        tissue[rib & (dist <= 3.8)] = MARROW
        bone |= rib
    for side in lungs:
        lungs[side] &= ~bone
    truth = {"body": skin, "bone": bone, **lungs}
    return tissue, truth


def make_ct_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] = (32, 224, 224),
    spacing: tuple[float, float, float] = (5.0, 1.8, 1.8),
    noise_hu: float = 12.0,
    sub: int = 2,
) -> Phantom:
    """Render one seeded phantom; ``sub`` samples per voxel edge model the partial volume."""
    rng = np.random.default_rng(seed)
    params = {
        "a": float(rng.uniform(150, 180)),
        "b": float(rng.uniform(105, 125)),
        "fat": float(rng.uniform(8, 20)),
        "gap": float(rng.uniform(0.0, 25.0)),
        "lung_x": float(rng.uniform(68, 80)),
        "lung_a": float(rng.uniform(48, 58)),
        "lung_b": float(rng.uniform(70, 80)),
        "lung_z": float(rng.uniform(-10, 10)),
        "lung_zr": float(rng.uniform(95, 125)),
        "spine_phase": float(rng.uniform(0, 30)),
        "rib_phase": float(rng.uniform(-400, -374)),
    }
    nz, ny, nx = shape
    dz, dy, dx = spacing
    origin = (-(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy, -(nz - 1) / 2 * dz)
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    hu_sum = np.zeros(shape, dtype=np.float32)
    counts = {name: np.zeros(shape, dtype=np.float32) for name in TRUTH}
    zs = origin[2] + np.arange(nz, dtype=np.float32) * dz
    ys = origin[1] + np.arange(ny, dtype=np.float32) * dy
    xs = origin[0] + np.arange(nx, dtype=np.float32) * dx
    for oz in offsets:
        for oy in offsets:
            for ox in offsets:
                z, y, x = np.meshgrid(
                    zs + oz * dz, ys + oy * dy, xs + ox * dx, indexing="ij", sparse=False
                )
                tissue, truth = _paint(x, y, z, params)
                hu_sum += HU[tissue]
                for name in TRUTH:
                    counts[name] += truth[name]
    n = float(sub**3)
    hu = ndimage.gaussian_filter(hu_sum / n, sigma=(0.0, 0.6, 0.6))
    hu += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    truth_masks = {name: counts[name] / n >= 0.5 for name in TRUTH}
    return Phantom(np.rint(hu).astype(np.int16), spacing, origin, truth_masks)


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def write_phantom_series(phantom: Phantom, directory: Path, *, modality: str = "CT") -> list[Path]:
    """The phantom as an axial DICOM series (one file per slice, HU through rescale)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series, frame = new_uid(), new_uid(), new_uid()
    nz, ny, nx = phantom.hu.shape
    dz, dy, dx = phantom.spacing
    paths = []
    for k in range(nz):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = new_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.BodyPartExamined = "CHEST"  # what it is; routing reads it before the volume's size
        ds.PatientName, ds.PatientID = "Phantom^CT", "PHANTOM"
        ds.InstanceNumber = nz - k  # reversed on purpose: order must come from positions
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [
            phantom.origin[0],
            phantom.origin[1],
            phantom.origin[2] + k * dz,
        ]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (phantom.hu[k].astype(np.int32) + 1024).astype(np.int16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = directory / f"slice{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
