"""A real 108-slice head CT (Debian's ``invesalius-examples``) through the doors an admin uses:
``pacs-node routes test`` keeps it away from the torso model, and ``pacs-node segment
ct-classical`` finds its bone as the package's own threshold mask does, the head without the
head rest, and no lung in the paranasal sinuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from pacs_node.imaging.volume import load_series
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from tests.conftest import PACS_NODE, clean_env
from tests.invesalius_head import HeadCT, write_head_ct
from tests.overlays import save_overlay

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> HeadCT:
    return write_head_ct(tmp_path_factory.mktemp("head") / "ct")


def _patient(tissue: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The package's soft-tissue mask without the head rest: its largest connected piece."""
    parts, _ = ndimage.label(tissue)
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return np.asarray(parts == int(np.argmax(sizes)))


def _dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_a_head_ct_without_body_part_is_not_sent_to_the_torso_model(head: HeadCT) -> None:
    result = subprocess.run(
        [PACS_NODE, "routes", "test", str(head.paths[0].parent), "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (study,) = json.loads(result.stdout)
    assert study["outcome"] == "unrouted"
    assert study["jobs"] == []
    ct_rule = next(v for v in study["verdicts"] if v["rule"] == "ct-body")
    (series,) = ct_rule["series"]
    region = next(c for c in series["checks"] if c["attribute"] == "body_region")
    assert not region["passed"]
    assert region["reason"].startswith("HEAD ")


def test_ct_classical_on_a_real_head_ct(head: HeadCT, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [PACS_NODE, "segment", "ct-classical", str(head.paths[0].parent), "--out", str(out),
         "--models-dir", str(MODELS), "--no-results", "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    labels = np.asarray(nib.load(out / "labels.nii.gz").dataobj).transpose(2, 1, 0)
    assert labels.shape == head.hu.shape
    voxel_ml = float(np.prod(head.spacing)) / 1000.0
    patient = _patient(head.tissue)
    head_rest = head.tissue & ~patient
    assert np.count_nonzero(head_rest) * voxel_ml > 50.0  # the rest is there to be left out
    # bone: the package's bone mask (226 HU and above) on the patient, not on the head rest
    bone = labels == 4
    assert _dice(bone, head.bone & patient) > 0.95
    assert np.count_nonzero(bone & head_rest) * voxel_ml < 0.5
    # the head: the soft-tissue mask's largest piece, its cavities filled per slice
    outline = np.stack([ndimage.binary_fill_holes(s) for s in patient])
    assert _dice(labels > 0, outline) > 0.97
    assert np.count_nonzero((labels > 0) & head_rest) * voxel_ml < 1.0
    # the sinuses and mastoid cells hold air inside the body, yet are not lungs
    assert report["voxels"]["lung_left"] == 0
    assert report["voxels"]["lung_right"] == 0
    assert report["quality"] == {"verdict": "pass", "failures": []}


def test_the_head_ct_overlay(head: HeadCT, tmp_path: Path) -> None:
    """The key image of ct-classical's result on the head CT, at the orbits (bone, air in the
    sinuses, the head rest below), kept as an artifact and as the README's picture."""
    volume = load_series(head.paths)
    segmentation = Runner(Registry(MODELS), threads=2).segment("ct-classical", volume)
    path = save_overlay(volume, segmentation, tmp_path, "ct-classical-head-ct.png", z=20)
    assert path.stat().st_size > 10_000
