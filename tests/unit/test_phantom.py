"""The phantom generator: reproducible from its seed, labels consistent with the anatomy, and
written as DICOM that the node's own loader reads with the same geometry as the NIfTI pair."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from phantom.anatomy import LABEL_VALUE, Anatomy, Tissue, sample_anatomy
from phantom.raster import AxialGrid, rasterise
from phantom.render import TRAINING, Case, Ranges, render, render_ct, render_mr, render_xr
from phantom.writers import write_decathlon, write_dicom
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from pacs_node.evaluation.groundtruth import volume_from_nifti
from pacs_node.imaging.volume import VolumeKind, load_series

FAST = replace(TRAINING, pixel_mm=(3.0, 3.5), coverage_mm=(300.0, 320.0), thickness_mm=(4.0, 5.0))


def test_same_seed_same_case_other_seed_other_case() -> None:
    a, b, c = render_ct(11, FAST), render_ct(11, FAST), render_ct(12, FAST)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.labels, b.labels)
    assert a.settings == b.settings
    assert a.image.shape != c.image.shape or not np.array_equal(a.labels, c.labels)


def test_ct_labels_sit_on_plausible_tissue() -> None:
    case = render_ct(21, replace(FAST, metal=False))
    hu, lab = case.image, case.labels
    names = {v: n for n, v in LABEL_VALUE.items()}
    present = {names[v] for v in np.unique(lab) if v}
    assert {"body", "lung_left", "lung_right", "liver", "spine", "ribs", "heart"} <= present
    # median HU per structure, robust to noise and partial volume at the borders
    assert np.median(hu[lab == LABEL_VALUE["lung_left"]]) < -600
    assert np.median(hu[lab == LABEL_VALUE["lung_right"]]) < -600
    assert -30 < np.median(hu[lab == LABEL_VALUE["liver"]]) < 200
    assert np.median(hu[lab == LABEL_VALUE["spine"]]) > 120
    assert np.median(hu[lab == 0]) < -900  # air and table foam outside the body
    # left is +x (patient left, LPS): the left lung's centroid lies at larger x than the right
    xs = case.origin[0] + np.arange(hu.shape[2]) * case.spacing[2]
    left = xs[np.nonzero(lab == LABEL_VALUE["lung_left"])[2]].mean()
    right = xs[np.nonzero(lab == LABEL_VALUE["lung_right"])[2]].mean()
    assert left > 0 > right
    # every organ lies inside the body outline: nothing labelled where the image is air
    organs = (lab > 1) & (lab != LABEL_VALUE["lung_left"]) & (lab != LABEL_VALUE["lung_right"])
    assert np.mean(hu[organs] < -500) < 0.02


def test_slice_thickness_and_field_of_view_follow_the_ranges() -> None:
    thin = Ranges(thickness_mm=(0.6, 0.6), pixel_mm=(3.0, 3.0), coverage_mm=(40, 40))
    case = render_ct(5, thin)
    assert case.spacing[0] == pytest.approx(0.6)
    assert case.image.shape[0] == round(40 / 0.6)
    cropped = render_ct(5, replace(FAST, fov_scale=(0.6, 0.6)))
    assert cropped.settings["truncated"]
    # the body reaches the edge of a cropped field of view
    assert (cropped.labels[:, :, 0] == LABEL_VALUE["body"]).any() or (
        cropped.labels[:, :, -1] == LABEL_VALUE["body"]
    ).any()


def test_mr_and_radiograph_render_the_same_anatomy() -> None:
    mr = render_mr(31, FAST)
    assert mr.modality == "MR"
    assert mr.image.min() >= 0  # magnitude images (Rician noise)
    fat_like = np.median(mr.image[mr.labels == LABEL_VALUE["body"]])
    lung_like = np.median(mr.image[mr.labels == LABEL_VALUE["lung_left"]])
    assert lung_like < fat_like
    xr = render_xr(31)
    assert xr.image.shape[0] == 1
    assert xr.labels.shape == xr.image.shape
    assert set(np.unique(xr.labels)) == {0, 1, 2}
    # lungs are dark on a radiograph (less attenuation than the mediastinum and the spine)
    lungs = xr.labels[0] > 0
    middle = xr.image[0][:, xr.image.shape[2] // 2 - 5 : xr.image.shape[2] // 2 + 5]
    assert np.median(xr.image[0][lungs]) < np.median(middle)


@pytest.mark.parametrize("modality", ["CT", "MR", "DX"])
def test_dicom_series_reads_back_with_valid_geometry(modality: str, tmp_path: Path) -> None:
    case = render(modality, 41, FAST)
    volume = load_series(write_dicom(case, tmp_path / "dcm"))
    assert volume.modality == modality
    assert volume.shape == case.image.shape
    assert np.array_equal(volume.voxels, np.rint(case.image).astype(volume.voxels.dtype))
    assert volume.spacing[1:] == pytest.approx(case.spacing[1:])
    if modality == "DX":
        assert volume.kind is VolumeKind.IMAGE
        return
    assert volume.spacing[0] == pytest.approx(case.spacing[0], abs=1e-3)
    assert volume.origin == pytest.approx(case.origin, abs=1e-3)
    assert np.allclose(volume.direction, np.eye(3))


def test_decathlon_layout_matches_the_dicom_geometry(tmp_path: Path) -> None:
    case = render_ct(51, FAST)
    root = write_decathlon(tmp_path / "set", [], [case], "ct_test")
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTest"] == 1
    assert meta["labels"]["4"] == "liver"
    image = root / meta["test"][0]["image"]
    assert (root / meta["test"][0]["label"]).is_file()
    from_nifti = volume_from_nifti(image, "CT")
    from_dicom = load_series(write_dicom(case, tmp_path / "dcm"))
    assert np.allclose(from_nifti.affine_lps(), from_dicom.affine_lps(), atol=1e-3)
    assert np.array_equal(from_nifti.voxels, from_dicom.voxels)


def _whole_torso(seed: int) -> tuple[Anatomy, AxialGrid]:
    anatomy = sample_anatomy(seed)
    shape = (int((anatomy.z_apex - anatomy.z_low) / 3.0) + 1, 150, 150)
    return anatomy, AxialGrid(shape, (3.0, 3.0, 3.0), (-223.5, -223.5, anatomy.z_low))


@pytest.mark.parametrize("seed", [3, 8])
def test_kidneys_sit_in_their_own_fat_and_the_aorta_starts_at_the_heart(seed: int) -> None:
    anatomy, grid = _whole_torso(seed)
    raster = rasterise(anatomy, grid)
    lab = raster.labels
    for side in ("kidney_left", "kidney_right"):
        kidney = lab == LABEL_VALUE[side]
        assert kidney.sum() > 1000
        around = ndimage.binary_dilation(kidney) & ~kidney
        neighbours = set(np.unique(lab[around]).tolist())
        assert LABEL_VALUE["liver"] not in neighbours
        assert LABEL_VALUE["spleen"] not in neighbours
        assert np.mean(raster.tissue[around] == Tissue.VISCERAL_FAT) > 0.5
    # the heart drawn without the aorta: the aorta never reaches inside that outline
    others = tuple(t for t in anatomy.tubes if t.tissue is not Tissue.ARTERY)
    heart = rasterise(replace(anatomy, tubes=others), grid).labels == LABEL_VALUE["heart"]
    aorta = lab == LABEL_VALUE["aorta"]
    assert aorta.sum() > 1000
    assert not (aorta & heart).any()
    assert (ndimage.binary_dilation(aorta) & heart).any()  # but it leaves from the heart


REAL = replace(FAST, xr_anatomy=1.0, xr_department=1.0)
DEPARTMENT_SEEDS = range(3000, 3006)  # these six already show every effect


@functools.cache
def department_case(seed: int) -> Case:
    """Rendered once per run: the read-back and coverage tests share the same cases."""
    return render_xr(seed, REAL)


def test_radiograph_realism_leaves_the_held_out_cases_as_they_were() -> None:
    """The realism draws come from their own stream: at share 0 a seed renders the same case
    whatever the share fields say elsewhere, and with them on it is still reproducible."""
    plain, again = render_xr(7003, FAST), render_xr(7003, replace(FAST, xr_anatomy=0.0))
    assert np.array_equal(plain.image, again.image)
    real, real_again = render_xr(7003, REAL), render_xr(7003, REAL)
    assert np.array_equal(real.image, real_again.image)
    assert real.settings == real_again.settings
    assert not np.array_equal(plain.image, real.image)


@pytest.mark.parametrize("seed", DEPARTMENT_SEEDS)
def test_department_radiographs_read_back_as_rendered(seed: int, tmp_path: Path) -> None:
    """Whatever photometric interpretation, bit depth and spacing a case is written with, the
    node's loader hands back the rendered image (bright where attenuation is high) and knows
    when the spacing is unusable."""
    case = department_case(seed)
    (path,) = write_dicom(case, tmp_path)
    volume = load_series([path])
    assert np.array_equal(volume.voxels, np.rint(case.image).astype(volume.voxels.dtype))
    spacing = case.settings["spacing"]
    assert volume.spacing_known is (spacing == "known")
    assert volume.modality == ("DX" if spacing == "known" else "CR")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == case.settings["photometric"]
    assert int(ds.BitsStored) == case.settings["bits"]
    # the evaluation's NIfTI copy holds the same image (NIfTI has no photometric flag)
    root = write_decathlon(tmp_path / "set", [], [case], "dx_test")
    meta = json.loads((root / "dataset.json").read_text())
    from_nifti = volume_from_nifti(root / meta["test"][0]["image"], "DX")
    assert np.array_equal(np.asarray(from_nifti.voxels), np.asarray(volume.voxels))
    # a lung field stays a lung field: both present, the patient's left at higher columns
    labels = case.labels[0]
    left, right = np.nonzero(labels == 1)[1], np.nonzero(labels == 2)[1]
    assert left.size > 0.03 * labels.size
    assert right.size > 0.03 * labels.size
    assert left.mean() > right.mean()


def test_department_effects_cover_what_departments_do() -> None:
    """Over a few seeds every effect occurs: both photometric interpretations, portable AP
    views, shutters, tilts, each way of writing the spacing."""
    seen: dict[str, set[object]] = {}
    for seed in DEPARTMENT_SEEDS:
        for key, value in department_case(seed).settings.items():
            seen.setdefault(key, set()).add(value)
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["spacing"] == {"known", "zero", "missing"}
    assert {"AP", "PA"} <= seen["view"]
    assert True in seen["portable"]
    assert True in seen["shutters"]
    assert len(seen["tilt_deg"]) > 3
