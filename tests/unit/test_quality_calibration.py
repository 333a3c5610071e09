"""The quality gate's default limits let plausible results through: held-out phantom renders of
every shipped family (seeds of ``make eval``'s held-out sets) and the demo study pass.

Each case is rendered, written as DICOM, loaded as the node loads it and run through the real
model, so a change to a model, to the phantom or to the limits that would hold good results
fails here. The false-hold rates over whole held-out sets are in the model cards."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from pacs_node.quality.calibrate import check, results

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(Registry(MODELS), threads=2)


@pytest.mark.parametrize(
    ("model", "modality", "seeds"),
    [
        ("xr-chest-lungs", "DX", (7000, 7001)),  # held-out radiographs
        ("mr-torso-organs", "MR", (6000,)),  # held-out MR
        ("ct-torso-organs", "CT", (5000,)),  # held-out CT
        ("ct-torso-organs", "demo", (777, 4242)),  # the demo studies the integration tests send
    ],
)
def test_phantom_families_and_the_demo_pass_the_default_limits(
    runner: Runner, model: str, modality: str, seeds: tuple[int, ...]
) -> None:
    limits = runner.registry.get(model).quality
    assert limits.sizes, f"{model} ships no limits"
    report = check(results(runner, model, modality, seeds), limits)
    assert report["held"] == 0, report["failed_checks"]
    assert report["cases"] == len(seeds)
