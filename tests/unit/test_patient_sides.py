"""Left is the patient's left in what the phantom writes and in what each shipped model labels.

The side is decided from the written DICOM alone, read back with plain pydicom: Patient
Orientation (0020,0020) for a radiograph (PS3.3 C.7.6.1.1.1: its first value is the patient
direction along which the column index increases), Image Orientation / Position (Patient) for CT
and MR (patient LPS: +x is the patient's left). Nothing here uses the node's geometry code, so a
mirror in the renderer, the writer or the loader cannot hide behind a shared mistake."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from phantom.anatomy import LABEL_VALUE
from phantom.render import DEFAULTS, modality_key, render
from phantom.writers import write_dicom

from pacs_node.imaging import load_series
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner

MODELS = Path(__file__).resolve().parents[2] / "models"
LEFT, RIGHT, HEART, SPINE = (LABEL_VALUE[n] for n in ("lung_left", "lung_right", "heart", "spine"))


def patient_left_along_columns(orientation: list[str]) -> int:
    """+1 when the column index increases toward the patient's left, -1 toward the right."""
    row_direction = orientation[0].upper()
    assert row_direction[:1] in ("L", "R"), orientation
    return 1 if row_direction[0] == "L" else -1


def column_side(mask: NDArray[np.bool_], columns: int, left_sign: int) -> float:
    """Signed offset (columns) of the mask's centroid from the image centre; > 0: patient left."""
    cols = np.nonzero(mask)[-1]
    return float(cols.mean() - (columns - 1) / 2) * left_sign


def lps_x(paths: list[Path], labels: NDArray[np.integer], value: int) -> float:
    """Mean patient x (LPS mm) of the voxels holding ``value``, from the written slices' own
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing."""
    total, count = 0.0, 0
    for path, plane in zip(paths, labels, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = np.nonzero(plane == value)
        if not rows.size:
            continue
        iop = [float(v) for v in ds.ImageOrientationPatient]
        dy, dx = (float(v) for v in ds.PixelSpacing)
        x = float(ds.ImagePositionPatient[0]) + cols * dx * iop[0] + rows * dy * iop[3]
        total += float(x.sum())
        count += rows.size
    assert count, f"label {value} absent"
    return total / count


def small(modality: str) -> object:
    return replace(
        DEFAULTS[modality_key(modality)],
        pixel_mm=(2.8, 3.2),
        coverage_mm=(200.0, 210.0),
        thickness_mm=(5.0, 6.0),
        fov_scale=(1.2, 1.3),
        metal=False,
    )


@pytest.mark.parametrize("seed", [7001])
def test_the_radiograph_phantom_is_not_mirrored(seed: int, tmp_path: Path) -> None:
    case = render("DX", seed, small("DX"))  # type: ignore[arg-type]
    (path,) = write_dicom(case, tmp_path)
    ds = pydicom.dcmread(path)
    left = patient_left_along_columns(list(ds.PatientOrientation))
    labels = case.labels[0]
    value = {name: v for v, name in case.label_names.items()}  # the radiograph's own numbering
    LEFT, RIGHT = value["lung_left"], value["lung_right"]  # noqa: N806
    assert column_side(labels == LEFT, ds.Columns, left) > 0
    assert column_side(labels == RIGHT, ds.Columns, left) < 0
    # the heart, on the patient's left, fills the mediastinum's lower half: between the lungs,
    # in the lower half of the lung rows, the unlabelled gap lies left of the lungs' mid-point
    rows = np.flatnonzero((labels == LEFT).any(axis=1) & (labels == RIGHT).any(axis=1))
    lower = rows[len(rows) // 2 :]
    offsets = []
    for r in lower:
        lcols = np.flatnonzero(labels[r] == LEFT)
        rcols = np.flatnonzero(labels[r] == RIGHT)
        inner = sorted((lcols.min(), lcols.max(), rcols.min(), rcols.max()))
        gap_mid, outer_mid = (inner[1] + inner[2]) / 2, (inner[0] + inner[3]) / 2
        offsets.append((gap_mid - outer_mid) * left)
    assert np.median(offsets) > 0, offsets


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_the_ct_and_mr_phantoms_are_not_mirrored(modality: str, tmp_path: Path) -> None:
    case = render(modality, 7004, small(modality))  # type: ignore[arg-type]
    paths = write_dicom(case, tmp_path)
    midline = lps_x(paths, case.labels, SPINE)  # the midline
    assert lps_x(paths, case.labels, HEART) > midline
    assert lps_x(paths, case.labels, LEFT) > midline + 30
    assert lps_x(paths, case.labels, RIGHT) < midline - 30


SHIPPED = [
    (name, modality)
    for name, modality in (
        ("xr-chest-lungs", "DX"),
        ("ct-torso-organs", "CT"),
        ("mr-torso-organs", "MR"),
    )
    if (MODELS / name / "models" / "model.pt").is_file()
]


@pytest.mark.parametrize(("name", "modality"), SHIPPED)
def test_each_shipped_model_labels_the_patients_left_as_left(
    name: str, modality: str, tmp_path: Path
) -> None:
    case = render(modality, 7005, small(modality))  # type: ignore[arg-type]
    paths = write_dicom(case, tmp_path)
    labelmap = Runner(Registry(MODELS), threads=2).segment(name, load_series(paths)).labelmap
    values = {s.name: s.value for s in labelmap.segments}
    out = np.asarray(labelmap.labels)
    if modality == "DX":
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        left = patient_left_along_columns(list(ds.PatientOrientation))
        assert column_side(out[0] == values["lung_left"], ds.Columns, left) > 0
        assert column_side(out[0] == values["lung_right"], ds.Columns, left) < 0
        return
    midline = lps_x(paths, case.labels, SPINE)  # the midline
    assert lps_x(paths, out, values["lung_left"]) > midline + 30
    assert lps_x(paths, out, values["lung_right"]) < midline - 30
    if "heart" in values:
        assert lps_x(paths, out, values["heart"]) > midline


@pytest.mark.parametrize(
    ("seed", "flips"), [(7002, (True, False)), (7006, (False, True)), (7013, (True, True))]
)
def test_a_series_stored_flipped_keeps_the_patients_sides(
    seed: int, flips: tuple[bool, bool], tmp_path: Path
) -> None:
    """Rows or columns stored reversed (Image Orientation -1), as feet-first or prone series and
    some reformats are: the written geometry still puts each side where it is, and the CT model
    still labels the patient's left as left."""
    case = render("CT", seed, replace(small("CT"), context=1.0))  # type: ignore[arg-type]
    assert case.flips == flips
    paths = write_dicom(case, tmp_path)
    iop = [float(v) for v in pydicom.dcmread(paths[0]).ImageOrientationPatient]
    assert (iop[4] < 0, iop[0] < 0) == flips
    midline = lps_x(paths, case.labels, SPINE)
    assert lps_x(paths, case.labels, LEFT) > midline + 30
    assert lps_x(paths, case.labels, RIGHT) < midline - 30
    if not (MODELS / "ct-torso-organs" / "models" / "model.pt").is_file():
        return
    labelmap = (
        Runner(Registry(MODELS), threads=2).segment("ct-torso-organs", load_series(paths)).labelmap
    )
    values = {s.name: s.value for s in labelmap.segments}
    out = np.asarray(labelmap.labels)
    assert lps_x(paths, out, values["lung_left"]) > midline + 30
    assert lps_x(paths, out, values["lung_right"]) < midline - 30
