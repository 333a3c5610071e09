"""``pacs-node evaluate``'s parts: metrics against hand-computed cases, and the same numbers
from a DICOM-SEG ground truth (written by highdicom, as another tool would) as from the
equivalent NIfTI pair."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from phantom.anatomy import LABEL_VALUE
from phantom.render import TRAINING, render_ct
from phantom.writers import write_decathlon, write_dicom
from pydicom import dcmread
from pydicom.sr.codedict import codes

from pacs_node.evaluation.metrics import label_metrics
from pacs_node.evaluation.report import evaluate, summarise
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from tests.conftest import PACS_NODE

TINY = {
    "name": "tiny-ct",
    "modality": "CT",
    "labels": ["body", "lung_left", "lung_right", "liver"],
    "spacing_zyx_mm": [8.0, 8.0, 8.0],
    "patch_xyz": [32, 32, 16],
    "intensity": {"kind": "range", "a_min": -1000, "a_max": 1000},
    "network": {"channels": [4, 8], "num_res_units": 0},
    "augmentation": {"elastic_prob": 0.5, "flip_prob": 0.5},
    "soft_labels": True,
    "train_seeds": [0, 2],
    "val_seeds": [100, 101],
    "phantom": {"pixel_mm": [5.0, 6.0], "coverage_mm": [120.0, 140.0]},
    "epochs": 2,
    "steps_per_epoch": 2,
    "batch_size": 1,
    "threads": 1,
}


def _train_tiny(folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``pacs-node train`` on the TINY recipe, as a user runs it."""
    recipe = folder / "tiny.json"
    recipe.write_text(json.dumps(TINY))
    return subprocess.run(
        [PACS_NODE, "train", str(recipe), *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained end to end through ``pacs-node train`` (seconds; CI keeps the training
    path alive with it, augmentation in a loader process included)."""
    root = tmp_path_factory.mktemp("models")
    done = _train_tiny(root, "--out", str(root / "tiny-ct"), "--loaders", "1")
    assert done.returncode == 0, done.stderr
    (root / "train.stderr").write_text(done.stderr)
    return root


@pytest.mark.slow
def test_tiny_training_writes_a_bundle_the_registry_loads(tiny_models: Path) -> None:
    bundle = Registry(tiny_models).get("tiny-ct")
    assert [s.name for s in bundle.segments] == TINY["labels"]
    assert bundle.modalities == ("CT",)
    assert bundle.preprocessing is not None
    assert bundle.preprocessing.spacing_zyx_mm == (8.0, 8.0, 8.0)
    meta = json.loads((tiny_models / "tiny-ct/configs/metadata.json").read_text())
    assert meta["pacs_node"]["training"]["epochs_run"] == 2
    assert meta["pacs_node"]["training"]["commands"][-1].endswith("--loaders 1")
    card = (tiny_models / "tiny-ct/docs/README.md").read_text()
    assert "Not for clinical use until validated locally" in card
    assert "pacs-node train" in card
    said = (tiny_models / "train.stderr").read_text()  # not a terminal: one line per stage
    assert "epoch 1/2: loss" in said
    assert "epoch 2/2: loss" in said


def test_training_on_an_absent_gpu_fails_before_rendering(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = _train_tiny(tmp_path, "--out", str(tmp_path / "b"), "--device", "cuda")
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr
    assert "render" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_metrics_against_hand_counts() -> None:
    truth = np.zeros((1, 10, 10), dtype=bool)
    truth[0, 2:6, 2:6] = True  # 16 pixels
    pred = np.zeros_like(truth)
    pred[0, 2:6, 4:8] = True  # 16 pixels, 8 shared
    m = label_metrics(pred, truth, (1.0, 0.5, 0.5))
    assert m.dice == pytest.approx(0.5)
    assert m.iou == pytest.approx(8 / 24)
    assert m.precision == pytest.approx(0.5)
    assert m.recall == pytest.approx(0.5)
    assert m.volume_error_pct == pytest.approx(0.0)
    assert m.hd95_mm == pytest.approx(1.0)  # two columns of 0.5 mm
    empty = label_metrics(np.zeros_like(truth), truth, (1.0, 1.0, 1.0))
    assert empty.dice == 0.0
    assert empty.hd95_mm is None
    assert empty.asd_mm is None
    assert empty.precision is None
    assert empty.volume_error_pct == pytest.approx(-100.0)


def test_summary_counts_missing_hd95() -> None:
    rows = [
        {"labels": {"liver": {"dice": d, "iou": d, "hd95_mm": h, "asd_mm": h, "precision": 1.0,
                              "recall": d, "volume_error_pct": -10.0}}}
        for d, h in ((0.9, 4.0), (0.0, None), (0.8, 6.0))
    ]  # fmt: skip
    s = summarise(rows)["liver"]
    assert s["hd95_missing"] == 1
    assert s["hd95_mean"] == pytest.approx(5.0)
    assert s["dice_mean"] == pytest.approx(1.7 / 3, abs=1e-4)  # rounded to 4 places


def _seg_case(tmp_path: Path) -> tuple[Path, Path]:
    """One CT case as DICOM + DICOM-SEG (highdicom) and as a Decathlon NIfTI pair."""
    ranges = replace(TRAINING, pixel_mm=(5.0, 6.0), coverage_mm=(140.0, 150.0))
    case = render_ct(7, ranges)
    folder = tmp_path / "dicom" / "case7"
    files = write_dicom(case, folder)
    sources = [dcmread(p) for p in files]
    names = {"Liver": "liver", "Left lung": "lung_left", "right lung": "lung_right"}
    descriptions = []
    label_array = np.zeros(case.labels.shape, dtype=np.uint8)
    for number, (label, name) in enumerate(names.items(), start=1):
        label_array[case.labels == LABEL_VALUE[name]] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=codes.SCT.Organ,
                segmented_property_type=codes.SCT.Liver if name == "liver" else codes.SCT.Lung,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="other tool",
        manufacturer_model_name="annotator",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(folder / "seg.dcm")
    nifti = write_decathlon(tmp_path / "nifti", [], [case], "ct")
    return tmp_path / "dicom", nifti


def test_dicom_seg_truth_gives_the_numbers_of_the_nifti_pair(
    tiny_models: Path, tmp_path: Path
) -> None:
    dicom, nifti = _seg_case(tmp_path)
    runner = Runner(Registry(tiny_models), threads=1)
    from_seg = evaluate(runner, "tiny-ct", dicom)
    label_map = {"liver": 4, "lung_left": 2, "lung_right": 3}
    from_nifti = evaluate(runner, "tiny-ct", nifti, label_map=label_map)
    seg_labels = from_seg["per_case"][0]["labels"]
    nifti_labels = from_nifti["per_case"][0]["labels"]
    assert set(seg_labels) == {"liver", "lung_left", "lung_right"}
    # NIfTI stores its affine in float32: distances and volumes agree to that precision
    for name, metrics in seg_labels.items():
        for key, value in metrics.items():
            other = nifti_labels[name][key]
            assert (value is None) == (other is None), (name, key)
            if value is not None:
                assert value == pytest.approx(other, rel=1e-5, abs=1e-4), (name, key)
    assert seg_labels["liver"]["dice"] == nifti_labels["liver"]["dice"]


def test_evaluate_command_writes_json_markdown_and_plots(tiny_models: Path, tmp_path: Path) -> None:
    _, nifti = _seg_case(tmp_path)
    out = tmp_path / "report"
    done = subprocess.run(
        [PACS_NODE, "evaluate", "tiny-ct", str(nifti), "--out", str(out),
         "--models-dir", str(tiny_models)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["cases"] == 1
    assert set(report["summary"]) == set(TINY["labels"])  # dataset.json names all 11 labels
    assert "| liver |" in (out / "report.md").read_text()
    for plot in ("dice.png", "hd95.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
