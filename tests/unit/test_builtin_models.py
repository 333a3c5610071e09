"""The committed weights of each built-in model still segment unseen phantoms: two held-out
cases per model through ``evaluate`` (runner, mapping back to the source grid). The full
held-out sets and their numbers are in each bundle's eval/ folder and model card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from phantom.render import DEFAULTS, modality_key, render
from phantom.writers import write_decathlon

from pacs_node.demo import make_study
from pacs_node.evaluation.report import evaluate
from pacs_node.imaging import Volume, load_series
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from pacs_node.results import measure_labelmap

MODELS = Path(__file__).resolve().parents[2] / "models"
# model -> (modality, first held-out seed, labels with the Dice two cases must reach)
CHECKS = {
    "xr-chest-lungs": ("DX", 7000, {"lung_left": 0.9, "lung_right": 0.9}),
    "ct-torso-organs": (
        "CT",
        5000,
        {
            "body": 0.9,
            "lung_left": 0.9,
            "lung_right": 0.9,
            "liver": 0.8,
            "heart": 0.85,
            "spine": 0.8,
        },
    ),
    "mr-torso-organs": ("MR", 6000, {"body": 0.85, "lung_left": 0.85, "liver": 0.8}),
}
SHIPPED = [name for name in CHECKS if (MODELS / name / "models" / "model.pt").is_file()]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reaches_its_dice_on_two_unseen_cases(name: str, tmp_path: Path) -> None:
    modality, first, minimum = CHECKS[name]
    # coarser source pixels than the full held-out set keep this test quick
    base = DEFAULTS[modality_key(modality)]
    ranges = replace(base, pixel_mm=(1.8, 2.2), coverage_mm=(250.0, 300.0))
    cases = [render(modality, seed, ranges) for seed in (first, first + 1)]
    data = write_decathlon(tmp_path / "data", [], cases, modality.lower())
    report = evaluate(Runner(Registry(MODELS), threads=2), name, data)
    assert report["cases"] == 2
    for label, dice in minimum.items():
        assert report["summary"][label]["dice_mean"] >= dice, (label, report["summary"][label])


@pytest.fixture(scope="module")
def demo_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """The demo's phantom CT (seed 1: before the body clean-up, its body came out in 28 pieces)."""
    _, paths = make_study(tmp_path_factory.mktemp("demo"), seed=1)
    return load_series(paths)


@pytest.mark.parametrize(
    "name", [n for n in ("ct-classical", "ct-torso-organs") if n == "ct-classical" or n in SHIPPED]
)
def test_body_is_one_piece_after_the_shipped_clean_up(name: str, demo_volume: Volume) -> None:
    """Measured as the report measures it (26-connected), not as the clean-up labels it."""
    labelmap = Runner(Registry(MODELS), threads=2).segment(name, demo_volume).labelmap
    findings = {f.segment.name: f for f in measure_labelmap(demo_volume, labelmap)}
    assert findings["body"].components == 1
    assert not [f.label for f in findings.values() if f.fragmented]
    for finding in findings.values():
        if finding.segment.structure.laterality is not None:
            assert not finding.side_conflict, finding.label


def test_the_lung_model_holds_on_radiographs_as_departments_write_them(tmp_path: Path) -> None:
    """Two held-out seeds with the extra anatomy and every department effect (the card's
    `department` set): inverted photometric, shutters, markers, tilt and the rest."""
    base = DEFAULTS["DX"]
    ranges = replace(base, pixel_mm=(1.8, 2.2), xr_anatomy=1.0, xr_department=1.0)
    cases = [render("DX", seed, ranges) for seed in (7002, 7003)]
    data = write_decathlon(tmp_path / "data", [], cases, "dx")
    report = evaluate(Runner(Registry(MODELS), threads=2), "xr-chest-lungs", data)
    for label in ("lung_left", "lung_right"):
        assert report["summary"][label]["dice_mean"] >= 0.85, (label, report["summary"][label])
