"""Anatomical limits on a model's labels: each rule on small synthetic arrays, the bundle
declaration, and the shipped torso models on real scans from pydicom's test corpus."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from pacs_node.errors import BundleError
from pacs_node.imaging.volume import load_series
from pacs_node.inference.anatomy import (
    NOT_AIR,
    OUTSIDE_BODY,
    OUTSIDE_PATIENT,
    AnatomyRules,
    apply_anatomy,
)
from pacs_node.inference.classical import patient_mask
from pacs_node.inference.registry import Registry, load_bundle
from pacs_node.inference.runner import Runner
from pacs_node.quality.checks import run_checks
from pacs_node.results import measure_labelmap
from pacs_node.training.recipe import load_recipe
from tests.conftest import PACS_NODE, clean_env
from tests.corpus_series import stack_corpus_file
from tests.overlays import save_overlay

MODELS = Path(__file__).resolve().parents[2] / "models"
SPACING = (5.0, 1.5, 1.5)
BODY, LUNG, LIVER = 1, 2, 3
RULES = AnatomyRules(body=BODY, air_only=(LUNG,), air_hu_max=-400.0, exclude_table=True)


def _torso() -> tuple[np.ndarray, np.ndarray]:
    """A CT (HU) and a model's labels: an elliptic trunk at 40 HU with an air-filled lung, and
    below it a 3 mm table plate at 300 HU that the model took for body."""
    zz, yy, xx = np.indices((6, 96, 96))
    trunk = ((yy - 40) / 28.0) ** 2 + ((xx - 48) / 38.0) ** 2 <= 1.0
    lung = ((yy - 35) / 10.0) ** 2 + ((xx - 35) / 9.0) ** 2 <= 1.0
    hu = np.full(zz.shape, -1000.0, dtype=np.float32)
    hu[trunk] = 40.0
    hu[lung] = -850.0
    hu[:, 78:80, 4:92] = 300.0  # the table, 10 rows below the trunk
    labels = np.zeros(zz.shape, dtype=np.uint8)
    labels[trunk] = BODY
    labels[lung] = LUNG
    labels[:, 78:80, 4:92] = BODY
    return hu, labels


def test_the_table_leaves_the_body() -> None:
    hu, labels = _torso()
    out, removals = apply_anatomy(labels, replace(RULES, air_only=()), SPACING, hu)
    assert not np.any(out[:, 70:] == BODY)  # nothing below the trunk
    assert np.array_equal(out[:, :70], labels[:, :70])  # the trunk as the model gave it
    table = [r for r in removals if r.rule == OUTSIDE_PATIENT]
    assert [(r.value, r.voxels) for r in table] == [(BODY, 6 * 2 * 88)]
    assert table[0].ml == pytest.approx(6 * 2 * 88 * 5.0 * 1.5 * 1.5 / 1000, abs=0.05)


def test_an_organ_outside_the_body_becomes_background_one_inside_stays() -> None:
    hu, labels = _torso()
    labels[:, 55:60, 60:70] = LIVER  # inside the trunk
    hu[:, 4:14, 4:14] = -1000.0
    labels[:, 4:14, 4:14] = LUNG  # in the air beside the patient
    out, removals = apply_anatomy(labels, RULES, SPACING, hu)
    assert not np.any(out[:, 4:14, 4:14])
    assert np.all(out[:, 55:60, 60:70] == LIVER)
    lung = (labels == LUNG) & (np.indices(labels.shape)[1] > 20)
    assert np.count_nonzero(out == LUNG) > 0.95 * np.count_nonzero(lung)  # the lung in the trunk
    assert (LUNG, OUTSIDE_BODY, 600) in {(r.value, r.rule, r.voxels) for r in removals}


def test_on_mr_a_lung_beside_the_body_is_removed_without_hu() -> None:
    _, labels = _torso()
    labels[:, 78:80, :] = 0
    labels[:, 2:10, 80:92] = LUNG  # beside the arm, touching nothing labelled body
    labels[:, 0:12, 40:56] = LUNG  # in the air above the trunk, touching its edge
    labels[:, 40:50, 90:96] = BODY  # an arm apart from the trunk: still body
    assert np.any(labels[:, 12, 40:56] == BODY)
    mr = AnatomyRules(body=BODY)
    out, removals = apply_anatomy(labels, mr, SPACING, None)
    assert not np.any(out[:, :12])
    assert np.all(out[:, 40:50, 90:96] == BODY)
    assert np.array_equal(out[:, 12:], labels[:, 12:])
    assert [(r.value, r.rule) for r in removals] == [(LUNG, OUTSIDE_BODY)]
    assert removals[0].voxels == 6 * (8 * 12 + 12 * 16)


def test_lung_voxels_of_soft_tissue_become_body_vessels_inside_stay_lung() -> None:
    hu, labels = _torso()
    labels[:, 55:62, 50:60] = LUNG  # soft tissue the model called lung
    hu[:, 34:36, 34:36] = 40.0  # a vessel inside the aerated lung
    out, removals = apply_anatomy(labels, RULES, SPACING, hu)
    assert np.all(out[:, 55:62, 50:60] == BODY)
    assert np.all(out[:, 34:36, 34:36] == LUNG)
    # the aerated lung stays, bar the single-pixel tips of the ellipse a 3 x 3 mean lifts
    kept = np.count_nonzero(out[:, :50] == LUNG)
    assert 0.95 * np.count_nonzero(labels[:, :50] == LUNG) < kept
    assert np.all(out[labels == LUNG] != 0)  # lung tissue inside the trunk is body, not nothing
    soft = [r for r in removals if r.rule == NOT_AIR]
    assert 6 * 7 * 10 <= sum(r.voxels for r in soft) < 6 * 7 * 10 + 6 * 8


def test_lungs_cut_by_the_field_edge_stay_lungs() -> None:
    """A targeted field: the trunk fills the image and both lungs reach its side edges."""
    hu = np.full((6, 80, 64), 40.0, dtype=np.float32)
    hu[:, 70:, :] = -1000.0  # air below the patient's back, the field's bottom rows
    hu[:, 15:45, 0:18] = -850.0  # the right lung, cut by the left edge
    hu[:, 15:45, 46:64] = -850.0  # the left lung, cut by the right edge
    labels = np.where(hu > -500, BODY, 0).astype(np.uint8)
    labels[:, 15:45, 0:18] = LUNG
    labels[:, 15:45, 46:64] = LIVER  # a second air-filled label, as the other lung
    shipped = AnatomyRules(body=BODY, confine_to_body=True, exclude_table=True)
    out, removals = apply_anatomy(labels, shipped, SPACING, hu)
    assert np.array_equal(out == LUNG, labels == LUNG)
    assert np.array_equal(out == LIVER, labels == LIVER)
    assert not [r for r in removals if r.value in (LUNG, LIVER)]
    assert patient_mask(hu, SPACING)[:, 15:45, 0:18].all()


def test_lungs_cut_by_the_reconstruction_circle_stay_lungs() -> None:
    """A field smaller than the patient, padded beyond the reconstruction circle as scanners
    write it: a lung that reaches the circle is inside the patient, the air in front is not."""
    zz, yy, xx = np.indices((6, 96, 96))
    inside = ((yy - 47.5) / 48.0) ** 2 + ((xx - 47.5) / 48.0) ** 2 <= 1.0
    trunk = (((yy - 50) / 32.0) ** 2 + ((xx - 47.5) / 75.0) ** 2 <= 1.0) & inside
    lung = (((yy - 48) / 10.0) ** 2 + ((xx - 86) / 14.0) ** 2 <= 1.0) & inside
    hu = np.full(zz.shape, -1000.0, dtype=np.float32)
    hu[trunk] = 40.0
    hu[lung] = -850.0
    hu[:, ~inside[0]] = -1024.0  # padding outside the circle
    assert (ndimage.binary_dilation(~inside[0]) & lung[0]).sum() >= 5  # it reaches the circle
    labels = np.where(hu > -500, BODY, 0).astype(np.uint8)
    labels[lung] = LUNG
    shipped = AnatomyRules(body=BODY, confine_to_body=True, exclude_table=True)
    out, removals = apply_anatomy(labels, shipped, SPACING, hu)
    assert np.array_equal(out == LUNG, labels == LUNG)
    assert not [r for r in removals if r.value == LUNG]
    patient = patient_mask(hu, SPACING)
    assert patient[lung].all()
    assert not patient[:, 5, 48].any()  # the air in front of the patient stays outside


def test_lung_without_air_stays_lung_under_the_shipped_rules() -> None:
    """Consolidation: the lung's lower half at soft-tissue density is still lung."""
    hu, labels = _torso()
    lung = labels == LUNG
    rows = np.indices(labels.shape)[1]
    hu[lung & (rows >= 35)] = 30.0
    shipped = AnatomyRules(body=BODY, confine_to_body=True, exclude_table=True)
    out, _ = apply_anatomy(labels, shipped, SPACING, hu)
    assert np.array_equal(out == LUNG, lung)


def test_the_bundle_declares_the_rules_by_label_name(tmp_path: Path) -> None:
    ct = Registry(MODELS).get("ct-torso-organs")
    names = {s.name: s.value for s in ct.segments}
    # no air_only: lung that holds no air (consolidation, effusion) must stay lung
    assert ct.anatomy == AnatomyRules(body=names["body"], confine_to_body=True, exclude_table=True)
    assert Registry(MODELS).get("mr-torso-organs").anatomy == AnatomyRules(body=names["body"])
    assert Registry(MODELS).get("ct-classical").anatomy is None  # undeclared: untouched
    # the shipped recipe is what the bundle carries, anatomy included
    for name in ("ct-torso-organs", "mr-torso-organs"):
        meta = json.loads((MODELS / name / "configs/metadata.json").read_text())
        recipe = load_recipe(MODELS / "recipes" / f"{name}-gpu.yaml").model_dump(mode="json")
        assert recipe == meta["pacs_node"]["training"]["recipe"]
        assert recipe["anatomy"] == meta["pacs_node"]["anatomy"]
    # a rule naming a label the bundle lacks is refused, naming the key
    bundle = tmp_path / "ct-torso-organs"
    for sub in ("configs", "models", "docs"):
        (bundle / sub).mkdir(parents=True)
    for path in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        (bundle / path).write_bytes((MODELS / "ct-torso-organs" / path).read_bytes())
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    meta["pacs_node"]["anatomy"]["air_only"] = ["lung_left", "trachea"]
    (bundle / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"pacs_node\.anatomy\.air_only"):
        load_bundle(bundle)


def test_ct_torso_organs_on_a_real_abdominal_ct(tmp_path: Path) -> None:
    """The corpus' abdominal CT slice, 16 times: no label in the air or on the table, no lung."""
    paths = stack_corpus_file("explicit_VR-UN.dcm", tmp_path / "ct", 16, 5.0)
    out = tmp_path / "out"
    result = subprocess.run(
        [PACS_NODE, "segment", "ct-torso-organs", str(tmp_path / "ct"), "--out", str(out),
         "--models-dir", str(MODELS), "--no-results", "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    volume = load_series(paths)
    labels = np.asarray(nib.load(out / "labels.nii.gz").dataobj).transpose(2, 1, 0)
    patient = patient_mask(volume.voxels, volume.spacing)
    assert np.count_nonzero((labels > 0) & ~patient) == 0
    ml = float(np.prod(volume.spacing)) / 1000.0
    table = (volume.voxels > -500) & ~patient  # dense, yet not the patient: the table's arc
    assert np.count_nonzero(table) * ml > 200.0
    assert not np.any(labels[table])
    lungs = np.count_nonzero(np.isin(labels, [2, 3])) * ml
    assert lungs < 50.0
    assert report["quality"]["verdict"] == "fail"  # held: a speck of right lung
    assert ("size_range", "lung_right") in {
        (f["check"], f["label"]) for f in report["quality"]["failures"]
    }
    removed = {(r["label"], r["rule"]): r["ml"] for r in report["removed"]}
    assert removed[("lung_left", OUTSIDE_BODY)] > 100.0
    assert any(n.startswith("lung_left: ") and "outside the body removed" in n
               for n in report["notes"])  # fmt: skip


def test_the_real_ct_overlay(tmp_path: Path) -> None:
    """The key image of ct-torso-organs on the corpus' abdominal CT slice (the stack's middle),
    kept as an artifact and as the README's picture."""
    paths = stack_corpus_file("explicit_VR-UN.dcm", tmp_path / "ct", 16, 5.0)
    volume = load_series(paths)
    result = Runner(Registry(MODELS), threads=2).segment("ct-torso-organs", volume)
    path = save_overlay(volume, result, tmp_path, "ct-torso-organs-real-ct.png", z=8)
    assert path.stat().st_size > 10_000


def test_mr_torso_organs_on_a_real_abdominal_mr(tmp_path: Path) -> None:
    """The corpus' abdominal MR slice, 16 times: no lung beside the arm, outside the patient."""
    paths = stack_corpus_file("MR-SIEMENS-DICOM-WithOverlays.dcm", tmp_path / "mr", 16, 4.0)
    volume = load_series(paths)
    result = Runner(Registry(MODELS), threads=2).segment("mr-torso-organs", volume)
    save_overlay(volume, result, tmp_path, "mr-torso-organs-real-mr.png", z=8)
    lungs = np.isin(result.labelmap.labels, [2, 3])
    # the patient independently of the model: signal above 15 % of the bright end, filled per
    # slice, its largest piece (the trunk)
    signal = volume.voxels > 0.15 * np.percentile(volume.voxels, 99)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in signal])
    parts, _ = ndimage.label(filled)
    trunk = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
    assert np.count_nonzero(lungs & ~trunk) == 0
    assert any(n.startswith("lung_") and "outside the body removed" in n for n in result.notes)
    # the gate holds it: kidneys and lungs on the wrong sides (a model trained on plain T1/T2)
    findings = measure_labelmap(volume, result.labelmap)
    limits = Registry(MODELS).get("mr-torso-organs").quality
    verdict = run_checks(volume, findings, limits, result.labelmap)
    failed = {(f.check, f.label) for f in verdict.failures}
    assert ("side_conflict", "kidney_left") in failed, verdict.sentences()
