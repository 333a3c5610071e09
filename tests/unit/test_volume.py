"""A series becomes a Volume with the right geometry, or a refusal that says why."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pacs_node.errors import VolumeError
from pacs_node.imaging import Volume, VolumeKind, load_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
ROWS, COLS = 12, 10
PIXEL = (0.7, 0.8)  # PixelSpacing: between rows, between columns


def _oblique() -> tuple[float, ...]:
    """Axial rotated 20 degrees about S, then tipped 15 degrees about the rotated row axis."""
    a, b = np.radians(20.0), np.radians(15.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col0 = np.array([-np.sin(a), np.cos(a), 0.0])
    normal0 = np.cross(row, col0)
    col = np.cos(b) * col0 + np.sin(b) * normal0
    return (*row.round(8), *col.round(8))


def _stored(index: int) -> np.ndarray:
    """Pixel values that identify the slice (index) and the row/column layout."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    return (1000 + 50 * index + 3 * r + c).astype(np.uint16)


def _slice(
    *,
    position: Sequence[float],
    index: int,
    orientation: Sequence[float] = AXIAL,
    instance_number: int = 1,
    series_uid: str = "1.2.3.4",
    acquisition: int | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slope: float = 1.0,
    intercept: float = -1024.0,
    rows: int = ROWS,
    cols: int = COLS,
    pixels: np.ndarray | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance_number
    if acquisition is not None:
        ds.AcquisitionNumber = acquisition
    ds.ImageOrientationPatient = [f"{v:.8g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.PixelSpacing = list(PIXEL)
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    data = _stored(index)[:rows, :cols] if pixels is None else pixels
    ds.PixelData = np.ascontiguousarray(data, dtype=np.uint16).tobytes()
    return ds


def _series(
    count: int,
    *,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.5,
    origin: Sequence[float] = (-30.0, -20.0, 100.0),
    positions: Sequence[float] | None = None,
) -> list[Dataset]:
    """Slices along the normal, InstanceNumber deliberately opposite to position order."""
    o = np.array(orientation)
    normal = np.cross(o[:3], o[3:])
    steps = [i * spacing for i in range(count)] if positions is None else list(positions)
    return [
        _slice(
            position=np.array(origin) + s * normal,
            index=i,
            orientation=orientation,
            instance_number=len(steps) - i,
        )
        for i, s in enumerate(steps)
    ]


def _write(tmp_path: Path, datasets: Sequence[Dataset], *, shuffle: int = 7) -> list[Path]:
    paths = []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    random.Random(shuffle).shuffle(paths)
    return paths


def _check_geometry(volume: Volume, datasets: Sequence[Dataset]) -> None:
    """Every slice's ImagePositionPatient, and the DICOM pixel formula, match the affine."""
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for z, uid in enumerate(volume.sop_instance_uids):
        if not uid:
            continue
        ds = by_uid[uid]
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        np.testing.assert_allclose(volume.index_to_patient([z, 0, 0]), ipp, atol=1e-4)
        r, c = 5, 7  # PS3.3 C.7.6.2.1.1: P = S + c * dx * row_dir + r * dy * col_dir
        expected = ipp + c * dx * iop[:3] + r * dy * iop[3:]
        np.testing.assert_allclose(volume.index_to_patient([z, r, c]), expected, atol=1e-4)
    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-6)
    assert np.linalg.det(volume.direction) == pytest.approx(1.0)
    back = volume.patient_to_index(volume.index_to_patient([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(back, [[1.0, 2.0, 3.0]], atol=1e-9)


def test_shuffled_files_sort_by_position_not_instance_number(tmp_path: Path) -> None:
    datasets = _series(8)
    volume = load_series(_write(tmp_path, datasets))
    assert volume.shape == (8, ROWS, COLS)
    assert volume.kind is VolumeKind.SERIES
    assert volume.voxels.dtype == np.int16
    assert volume.spacing == pytest.approx((2.5, PIXEL[0], PIXEL[1]))
    assert volume.origin == pytest.approx((-30.0, -20.0, 100.0))
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    for z in range(8):
        np.testing.assert_array_equal(volume.voxels[z], _stored(z).astype(np.int16) - 1024)
    _check_geometry(volume, datasets)
    assert all("PixelData" not in h for h in volume.headers)
    assert len(volume.headers) == 8


def test_reversed_positions_put_z_along_the_normal(tmp_path: Path) -> None:
    datasets = _series(6, spacing=-3.0)  # positions run inferior
    volume = load_series(_write(tmp_path, datasets))
    assert volume.spacing[0] == pytest.approx(3.0)
    np.testing.assert_allclose(volume.direction[:, 2], [0.0, 0.0, 1.0])
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in reversed(datasets))
    np.testing.assert_array_equal(volume.voxels[0], _stored(5).astype(np.int16) - 1024)
    _check_geometry(volume, datasets)


def test_oblique_and_sagittal_geometry(tmp_path: Path) -> None:
    for name, orientation in (("oblique", _oblique()), ("sagittal", SAGITTAL)):
        folder = tmp_path / name
        folder.mkdir()
        datasets = _series(5, orientation=orientation, spacing=1.25)
        volume = load_series(_write(folder, datasets))
        _check_geometry(volume, datasets)
        assert volume.spacing[0] == pytest.approx(1.25)
        ras = volume.affine_ras()
        np.testing.assert_allclose(ras[:2], -volume.affine_lps()[:2])
        np.testing.assert_allclose(ras[2:], volume.affine_lps()[2:])


def test_datasets_load_like_files(tmp_path: Path) -> None:
    datasets = _series(4)
    from_files = load_series(_write(tmp_path, datasets))
    from_memory = load_series(list(reversed(datasets)))
    np.testing.assert_array_equal(from_files.voxels, from_memory.voxels)
    assert from_memory.sop_instance_uids == from_files.sop_instance_uids
    assert all("PixelData" not in h for h in from_memory.headers)
    assert "PixelData" in datasets[0]  # the caller's datasets are untouched


def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    datasets = _series(6)
    for i, ds in enumerate(datasets):  # each slice shifts 0.9 mm posterior: about 20 degrees
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.9 * i, z]
    with pytest.raises(VolumeError, match=r"gantry tilt.*about 19\.\d degrees"):
        load_series(_write(tmp_path, datasets))


def test_missing_slice_is_refused_or_filled(tmp_path: Path) -> None:
    datasets = _series(7)
    del datasets[3]
    paths = _write(tmp_path, datasets)
    with pytest.raises(VolumeError, match=r"missing slices.*2\.0 x the median"):
        load_series(paths)
    volume = load_series(paths, fill_gaps=True)
    assert volume.shape[0] == 7
    assert volume.filled_slices == (3,)
    assert volume.sop_instance_uids[3] == ""
    assert volume.frame_numbers[3] is None
    assert int(volume.voxels[3].max()) == int(volume.voxels.min())
    np.testing.assert_array_equal(volume.voxels[4], _stored(4).astype(np.int16) - 1024)
    _check_geometry(volume, datasets)


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    datasets = _series(6, positions=[0.0, 2.0, 4.0, 6.8, 8.8, 10.8])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        load_series(_write(tmp_path, datasets))


def test_small_position_noise_is_accepted(tmp_path: Path) -> None:
    datasets = _series(5, positions=[0.0, 2.001, 3.999, 6.002, 8.0])
    volume = load_series(_write(tmp_path, datasets))
    assert volume.spacing[0] == pytest.approx(2.0)


def test_duplicate_position_keeps_lowest_instance_number(tmp_path: Path) -> None:
    datasets = _series(5)
    twin = _slice(position=datasets[2].ImagePositionPatient, index=9, instance_number=99)
    datasets[2].InstanceNumber = 98
    volume = load_series(_write(tmp_path, [*datasets, twin]))
    assert volume.shape[0] == 5
    assert volume.sop_instance_uids[2] == datasets[2].SOPInstanceUID
    assert [d.sop_instance_uid for d in volume.dropped] == [twin.SOPInstanceUID]
    assert "duplicate" in volume.dropped[0].reason
    assert "InstanceNumber 98" in volume.dropped[0].reason


def test_every_position_repeated_is_a_dynamic_series(tmp_path: Path) -> None:
    datasets = _series(4) + _series(4)
    with pytest.raises(VolumeError, match="dynamic or multi-phase"):
        load_series(_write(tmp_path, datasets))


def test_same_instance_twice_is_dropped_once(tmp_path: Path) -> None:
    datasets = _series(3)
    volume = load_series([*datasets, datasets[1]])
    assert volume.shape[0] == 3
    assert [d.reason for d in volume.dropped] == ["the same instance was given twice"]


def test_overlapping_acquisitions_are_refused_distinct_ones_merged(tmp_path: Path) -> None:
    first, second = _series(4), _series(4)
    for ds in first:
        ds.AcquisitionNumber = 1
    for ds in second:
        ds.AcquisitionNumber = 2
    with pytest.raises(VolumeError, match="several acquisitions cover the same positions"):
        load_series(_write(tmp_path, first + second))
    merged = _series(8)
    for i, ds in enumerate(merged):
        ds.AcquisitionNumber = 1 if i < 4 else 2
    volume = load_series(merged)
    assert volume.shape[0] == 8
    _check_geometry(volume, merged)


def test_mixed_orientations_are_refused() -> None:
    datasets = _series(5) + _series(5, orientation=SAGITTAL)
    with pytest.raises(VolumeError, match=r"mixed orientations.*5 images.*5 images"):
        load_series(datasets)


def test_localizers_are_dropped_with_a_reason() -> None:
    datasets = _series(6)
    typed = _slice(position=(0, 0, 0), index=0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    scout = _slice(position=(0, -100, 0), index=0, orientation=SAGITTAL, rows=8, cols=8)
    volume = load_series([typed, *datasets, scout])
    assert volume.shape[0] == 6
    reasons = {d.sop_instance_uid: d.reason for d in volume.dropped}
    assert reasons[typed.SOPInstanceUID] == "ImageType LOCALIZER"
    assert "geometry differs" in reasons[scout.SOPInstanceUID]
    _check_geometry(volume, datasets)


def test_several_series_are_refused() -> None:
    datasets = _series(3)
    datasets[0].SeriesInstanceUID = "1.2.3.5"
    with pytest.raises(VolumeError, match="from 2 series"):
        load_series(datasets)


def test_fractional_rescale_gives_float32() -> None:
    datasets = [
        _slice(position=(0, 0, 2.0 * i), index=i, slope=0.5, intercept=-10) for i in range(3)
    ]
    volume = load_series(datasets)
    assert volume.voxels.dtype == np.float32
    np.testing.assert_allclose(volume.voxels[1], _stored(1) * 0.5 - 10)


def _planar(photometric: str, pixels: np.ndarray, **tags: object) -> Dataset:
    ds = _slice(position=(0, 0, 0), index=0, rows=pixels.shape[0], cols=pixels.shape[1])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del ds[keyword]
    ds.Modality = "CR"
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    else:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def test_monochrome1_is_inverted_and_imager_spacing_used() -> None:
    pixels = np.array([[0, 100], [4000, 4095]], dtype=np.uint16)
    volume = load_series([_planar("MONOCHROME1", pixels, ImagerPixelSpacing=[0.15, 0.2])])
    assert volume.kind is VolumeKind.IMAGE
    assert volume.inverted
    assert volume.spacing_known
    assert volume.spacing[1:] == pytest.approx((0.15, 0.2))
    np.testing.assert_array_equal(volume.voxels[0], 4095 - pixels.astype(np.int16))


@pytest.mark.parametrize(
    ("tags", "spacing", "source"),
    [
        (
            {"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.2, 0.2]},
            (0.2, 0.2),
            "Imager Pixel Spacing (at the detector, not corrected for magnification)",
        ),
        (
            {"ImagerPixelSpacing": [0.2, 0.3], "EstimatedRadiographicMagnificationFactor": 1.25},
            (0.16, 0.24),
            "Imager Pixel Spacing / Estimated Radiographic Magnification Factor 1.25",
        ),
        (
            {
                "PixelSpacing": [0.18, 0.18],
                "PixelSpacingCalibrationType": "GEOMETRY",
                "ImagerPixelSpacing": [0.2, 0.2],
            },
            (0.18, 0.18),
            "Pixel Spacing (calibration GEOMETRY)",
        ),
        ({"PixelSpacing": [0, 0]}, None, ""),
        ({"PixelSpacing": [-0.2, 0.2], "ImagerPixelSpacing": [0, 0]}, None, ""),
    ],
)
def test_radiograph_spacing_and_where_it_came_from(
    tags: dict[str, object], spacing: tuple[float, float] | None, source: str
) -> None:
    volume = load_series([_planar("MONOCHROME2", np.zeros((2, 2), np.uint16), **tags)])
    assert volume.spacing_known is (spacing is not None)
    assert volume.spacing_source == source
    if spacing is not None:
        assert volume.spacing[1:] == pytest.approx(spacing)


def test_rgb_becomes_luminance_and_unknown_spacing_is_flagged() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    pixels[1, 2] = (10, 200, 30)
    volume = load_series([_planar("RGB", pixels)])
    assert volume.from_color
    assert not volume.spacing_known
    assert volume.spacing[1:] == (1.0, 1.0)
    assert volume.voxels.shape == (1, 2, 3)
    assert volume.voxels[0, 0, 0] == pytest.approx(0.299 * 255, abs=1e-3)
    assert volume.voxels[0, 1, 2] == pytest.approx(0.299 * 10 + 0.587 * 200 + 0.114 * 30, abs=1e-3)


def test_several_unpositioned_images_are_refused() -> None:
    images = [_planar("MONOCHROME2", np.ones((2, 2))) for _ in range(2)]
    with pytest.raises(VolumeError, match="separate 2D images"):
        load_series(images)


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(VolumeError, match="not a readable DICOM file"):
        load_series([bad])


def test_pixel_data_is_never_held_twice(tmp_path: Path) -> None:
    rows = cols = 256
    count = 32
    datasets = [
        _slice(
            position=(0, 0, 1.0 * i),
            index=i,
            rows=rows,
            cols=cols,
            pixels=np.full((rows, cols), i, dtype=np.uint16),
        )
        for i in range(count)
    ]
    paths = _write(tmp_path, datasets)
    del datasets
    load_series(paths[:2])  # decoders imported before measuring
    tracemalloc.start()
    try:
        volume = load_series(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert volume.voxels.dtype == np.int16
    # Holding every decoded slice next to the stack would at least double the peak.
    assert peak < 1.4 * volume.voxels.nbytes


# --------------------------------------------------------------------------- pydicom-data files


def _file(name: str) -> str:
    return str(get_testdata_file(name))


def test_enhanced_ct_frames_sorted_by_plane_position() -> None:
    path = _file("eCT_Supplemental.dcm")
    volume = load_series([path])
    ds = dcmread(path)
    assert volume.shape == (2, 512, 512)
    assert volume.kind is VolumeKind.SERIES
    # IOP [-1,0,0,0,1,0]: the normal points inferior, so frame 2 (z=-149) comes first.
    assert volume.frame_numbers == (2, 1)
    positions = [
        np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    np.testing.assert_allclose(volume.index_to_patient([0, 0, 0]), positions[1], atol=1e-4)
    np.testing.assert_allclose(volume.index_to_patient([1, 0, 0]), positions[0], atol=1e-4)
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    np.testing.assert_allclose(volume.voxels[0], ds.pixel_array[1].astype(np.float32) - 1024.0)


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
    ],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(
    compressed: str, reference: str
) -> None:
    got, want = load_series([_file(compressed)]), load_series([_file(reference)])
    assert got.shape == want.shape
    assert got.kind == want.kind
    np.testing.assert_array_equal(got.voxels, want.voxels)


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("JPGExtended.dcm", (1, 1024, 256), VolumeKind.IMAGE),
        ("JPEG-LL.dcm", (1, 1024, 256), VolumeKind.IMAGE),
        ("SC_rgb_jpeg_dcmtk.dcm", (1, 100, 100), VolumeKind.IMAGE),
        ("JPEGLSNearLossless_16.dcm", (1, 50, 10), VolumeKind.IMAGE),
        ("MR2_J2KI.dcm", (1, 1024, 1024), VolumeKind.SERIES),
        ("image_dfl.dcm", (1, 512, 512), VolumeKind.IMAGE),
        ("OBXXXX1A_rle_2frame.dcm", (2, 600, 800), VolumeKind.FRAMES),
        ("emri_small.dcm", (10, 64, 64), VolumeKind.FRAMES),
    ],
)
def test_other_syntaxes_and_kinds_load(name: str, shape: tuple[int, ...], kind: str) -> None:
    volume = load_series([_file(name)])
    assert volume.shape == shape
    assert volume.kind == kind
    assert np.isfinite(volume.voxels).all()
    assert float(volume.voxels.max()) > float(volume.voxels.min())


def test_rgb_ultrasound_and_monochrome1_radiograph_flags() -> None:
    us = load_series([_file("US1_UNCR.dcm")])
    assert us.modality == "US"
    assert us.from_color
    assert us.voxels.dtype == np.float32
    cr = load_series([_file("RG3_UNCR.dcm")])
    assert cr.modality == "CR"
    assert cr.inverted
    assert cr.shape == (1, 1760, 1760)
    raw = dcmread(_file("RG3_UNCR.dcm")).pixel_array
    hi = 2 ** int(dcmread(_file("RG3_UNCR.dcm")).BitsStored) - 1
    np.testing.assert_array_equal(cr.voxels[0], hi - raw.astype(np.int32))


def test_ras_affine_is_a_correct_nifti_affine(tmp_path: Path) -> None:
    datasets = _series(4, orientation=_oblique())
    volume = load_series(datasets)
    path = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.asarray(volume.voxels), volume.affine_ras()), path)
    image = nibabel.load(path)
    for z, ds in enumerate(datasets):
        lps = np.array(ds.ImagePositionPatient, dtype=float)
        ras = nibabel.affines.apply_affine(image.affine, [z, 0, 0])
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume.voxels)
    axial = load_series(_series(2))
    assert nibabel.aff2axcodes(axial.affine_ras()) == ("S", "P", "L")


def test_voxels_are_read_only() -> None:
    volume = load_series(_series(2))
    with pytest.raises(ValueError, match="read-only"):
        volume.voxels[0, 0, 0] = 1


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])  # J2K: pydicom-data files
def test_compressed_synthetic_series_matches_uncompressed(syntax: str, tmp_path: Path) -> None:
    plain = _series(4, orientation=_oblique())
    packed = _series(4, orientation=_oblique())
    for source, target in zip(plain, packed, strict=True):
        target.compress(syntax, generate_instance_uid=False)
        target.SOPInstanceUID = source.SOPInstanceUID
        target.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        target.ImagePositionPatient = source.ImagePositionPatient
    got = load_series(_write(tmp_path, packed))
    want = load_series(plain)
    assert packed[0].file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(got.voxels, want.voxels)
    _check_geometry(got, plain)


def _enhanced(frames: Sequence[tuple[float, float, float]], slopes: Sequence[int]) -> Dataset:
    """Enhanced CT: orientation and rescale per frame, pixel measures shared."""
    ds = _slice(position=(0, 0, 0), index=0)
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        del ds[keyword]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(PIXEL)
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for position, slope in zip(frames, slopes, strict=True):
        item, plane, orient, value, content = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = list(position)
        orient.ImageOrientationPatient = list(AXIAL)
        value.RescaleSlope, value.RescaleIntercept, value.RescaleType = slope, -1024, "HU"
        content.FrameAcquisitionNumber = 1
        item.PlanePositionSequence = [plane]
        item.PlaneOrientationSequence = [orient]
        item.PixelValueTransformationSequence = [value]
        item.FrameContentSequence = [content]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = b"".join(_stored(i).tobytes() for i in range(len(frames)))
    return ds


def test_enhanced_ct_with_per_frame_orientation_and_rescale() -> None:
    positions = [(0.0, 0.0, z) for z in (6.0, 0.0, 8.0, 2.0, 4.0)]
    slopes = [1, 2, 1, 2, 1]
    ds = _enhanced(positions, slopes)
    volume = load_series([ds])
    assert volume.shape == (5, ROWS, COLS)
    assert volume.frame_numbers == (2, 4, 5, 1, 3)
    assert set(volume.sop_instance_uids) == {ds.SOPInstanceUID}
    assert volume.spacing == pytest.approx((2.0, PIXEL[0], PIXEL[1]))
    for z, frame in enumerate(volume.frame_numbers):
        assert frame is not None
        expected = _stored(frame - 1).astype(np.int32) * slopes[frame - 1] - 1024
        np.testing.assert_array_equal(volume.voxels[z], expected)
        np.testing.assert_allclose(volume.index_to_patient([z, 0, 0]), positions[frame - 1])
    assert "PixelData" not in volume.headers[0]
