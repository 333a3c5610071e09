"""``pacs-node segment`` and ``pacs-node models`` as a researcher runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pacs_node.imaging.postprocess import clean_segments
from pacs_node.imaging.volume import load_series
from pacs_node.inference.classical import segment_ct
from pacs_node.inference.registry import Registry
from tests.conftest import PACS_NODE, clean_env
from tests.ct_phantom import make_ct_phantom, write_phantom_series
from tests.dicom_factory import write_series
from tests.zoo_bundle import TINY_UNET, inference_config, metadata, write_bundle

MODELS = Path(__file__).resolve().parents[2] / "models"


def pacs_node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACS_NODE, *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=120,
        check=False,
    )


def test_segment_writes_labels_on_the_source_grid(tmp_path: Path) -> None:
    phantom = make_ct_phantom(21, shape=(12, 160, 160), spacing=(5.0, 2.5, 2.5))
    series = tmp_path / "series"
    write_phantom_series(phantom, series)
    out = tmp_path / "out"
    result = pacs_node("segment", "ct-classical", str(series), "--out", str(out),
                       "--models-dir", str(MODELS), "--no-results")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert json.loads((out / "labels.json").read_text()) == {
        "1": "body",
        "2": "lung_left",
        "3": "lung_right",
        "4": "bone",
        "quality": {"verdict": "pass", "failures": []},
    }
    image = nib.load(out / "labels.nii.gz")
    volume = load_series(sorted(series.iterdir()))
    # the classical labels, then the clean-up the bundle declares
    cleanup = Registry(MODELS).get("ct-classical").cleanup
    expected = clean_segments(
        segment_ct(volume.voxels, volume.spacing, volume.direction), volume.spacing, cleanup
    )
    data = np.asarray(image.dataobj)
    assert data.shape == (160, 160, 12)  # x, y, z
    assert np.array_equal(data.transpose(2, 1, 0), expected)
    # the RAS affine: voxel (i, j, k) = (column, row, slice) sits where DICOM says
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    first = np.array(image.affine @ [0, 0, 0, 1])[:3]
    assert np.allclose(first, [-phantom.origin[0], -phantom.origin[1], phantom.origin[2]])
    corner = np.array(image.affine @ [159, 0, 11, 1])[:3]
    lps = volume.index_to_patient([11, 0, 159])
    assert np.allclose(corner, [-lps[0], -lps[1], lps[2]])
    assert int(image.header["sform_code"]) == 1


def test_segment_refuses_what_the_model_cannot_take(tmp_path: Path) -> None:
    write_series(tmp_path / "mr", modality="MR", slices=4, rows=16, columns=16)
    result = pacs_node("segment", "ct-classical", str(tmp_path / "mr"), "--out",
                       str(tmp_path / "o1"), "--models-dir", str(MODELS))  # fmt: skip
    assert result.returncode == 1
    assert "takes CT; this series is MR" in " ".join(result.stderr.split())
    # several series without --series: the choices are listed
    study = tmp_path / "study"
    write_series(study / "a", slices=3, rows=16, columns=16, series_number=1)
    write_series(study / "b", slices=3, rows=16, columns=16, series_number=2)
    result = pacs_node("segment", "ct-classical", str(study), "--out", str(tmp_path / "o2"),
                       "--models-dir", str(MODELS))  # fmt: skip
    assert result.returncode == 1
    assert "2 series found, choose one with --series" in " ".join(result.stderr.split())
    assert not (tmp_path / "o2" / "labels.nii.gz").exists()
    # a 3D zoo model on too few slices
    models = tmp_path / "models"
    write_bundle(models / "spleen", inference_config(TINY_UNET), metadata(
        {"0": "background", "1": "spleen"}))  # fmt: skip
    result = pacs_node("segment", "spleen", str(study / "a"), "--out", str(tmp_path / "o3"),
                       "--models-dir", str(models))  # fmt: skip
    assert result.returncode == 1
    assert "needs at least 8 slices; this series has 3" in " ".join(result.stderr.split())


@pytest.mark.parametrize("broken", [False, True])
def test_models_lists_bundles_as_json(tmp_path: Path, broken: bool) -> None:
    models = tmp_path / "models"
    root = write_bundle(models / "spleen_ct_segmentation", inference_config(TINY_UNET),
                        metadata({"0": "background", "1": "spleen"}))  # fmt: skip
    if broken:
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        del meta["version"]
        (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    env = clean_env()
    env["PACS_NODE_MODELS_DIR"] = str(models)
    result = pacs_node("models", "--json", env=env)
    if broken:
        assert result.returncode == 1
        message = "".join(result.stderr.split())  # rich wraps long lines
        assert f"{root / 'configs' / 'metadata.json'}:version:ismissing" in message
        assert result.stdout == ""
        return
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    digest = listed[0].pop("sha256")
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
    assert listed[0].pop("path") == str(root)
    assert listed[0].pop("allowed") is True
    assert listed == [
        {
            "name": "spleen_ct_segmentation",
            "version": "0.2.0",
            "kind": "network",
            "modalities": ["CT"],
            "labels": [
                {
                    "value": 1,
                    "name": "spleen",
                    "category": {"value": "123037004", "scheme": "SCT",
                                 "meaning": "Anatomical Structure"},
                    "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen",
                             "modifier": None},
                    "color": [140, 70, 180],
                }
            ],
        }
    ]  # fmt: skip


def test_segment_writes_everything_and_the_gate_verdict_beside_it(tmp_path: Path) -> None:
    """segment sends nothing, so a failed gate holds nothing back: every output is written and
    the verdict is in labels.json, in --json and in a readable line."""
    models = tmp_path / "models"
    shutil.copytree(MODELS / "ct-classical", models / "ct-classical")
    meta = models / "ct-classical" / "configs" / "metadata.json"
    data = json.loads(meta.read_text())
    data.setdefault("pacs_node", {})["quality"] = {"sizes": {"body": [0, 1]}}
    meta.write_text(json.dumps(data))
    phantom = make_ct_phantom(22, shape=(12, 96, 96), spacing=(5.0, 4.0, 4.0))
    series = tmp_path / "series"
    write_phantom_series(phantom, series)
    args = ("segment", "ct-classical", str(series), "--models-dir", str(models))
    shown = pacs_node(*args, "--out", str(tmp_path / "a"))
    assert shown.returncode == 0, shown.stderr
    assert "quality gate: FAIL (1 checks" in shown.stderr
    assert "size_range body: Body measures" in shown.stderr
    labels = json.loads((tmp_path / "a" / "labels.json").read_text())
    (failure,) = labels["quality"]["failures"]
    assert labels["quality"]["verdict"] == "fail"
    assert (failure["check"], failure["label"], failure["limit"]) == (
        "size_range",
        "body",
        "[0, 1] mL",
    )
    written = {p.name for p in (tmp_path / "a" / "dicom").iterdir()}
    assert {"seg.dcm", "sr.dcm", "gsps.dcm", "pdf.dcm"} <= written
    assert (tmp_path / "a" / "fhir-bundle.json").is_file()
    as_json = pacs_node(*args, "--out", str(tmp_path / "b"), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["quality"] == labels["quality"]
