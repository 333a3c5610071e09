"""Training targets: label fractions that keep each organ's volume and place its edge inside a
coarse voxel, and augmentation that moves them (and swaps left and right) like label values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pacs_node.cli.train import command_line
from pacs_node.imaging.volume import Grid
from pacs_node.training.dataset import Sample, label_fractions
from pacs_node.training.recipe import Recipe
from pacs_node.training.trainer import augmentation, patch_batches, resolve_device, soft_target


def _recipe(**changes: Any) -> Recipe:
    base: dict[str, Any] = {
        "name": "t",
        "modality": "CT",
        "labels": ["lung_left", "lung_right", "liver"],
        "spacing_zyx_mm": [4.0, 4.0, 4.0],
        "patch_xyz": [12, 10, 8],
        "intensity": {"kind": "range"},
        "augmentation": {"affine_prob": 0.0, "intensity_prob": 0.0, "flip_prob": 1.0},
        "train_seeds": [0, 1],
        "val_seeds": [1, 2],
    }
    return Recipe.model_validate({**base, **changes})


def test_label_fractions_keep_the_volume_and_grade_the_edge() -> None:
    # a 10 mm ball (label 1) on a 1 mm grid, averaged onto 4 mm voxels
    n = 48
    zz, yy, xx = np.mgrid[:n, :n, :n].astype(np.float32) - (n - 1) / 2
    ball = (np.sqrt(zz**2 + yy**2 + xx**2) < 10.0).astype(np.uint8)
    source = Grid.from_geometry(ball.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    target = Grid.from_geometry((12, 12, 12), (4.0, 4.0, 4.0), (1.5, 1.5, 1.5), np.eye(3))
    shares = label_fractions(ball, 2, source, target)
    assert shares.shape == (2, 12, 12, 12)
    assert not shares[1].any()  # label 2 is absent
    volume = shares[0].astype(np.float64).sum() / 255.0 * 64.0
    assert volume == pytest.approx(ball.sum(), rel=0.03)
    assert shares[0, 6, 6, 6] == 255
    assert shares[0, 0, 0, 0] == 0
    edge = (shares[0] > 25) & (shares[0] < 230)
    assert edge.sum() > 20  # the surface voxels are part ball, not 0 or 1


def test_soft_target_puts_background_first_and_sums_to_one() -> None:
    shares = torch.tensor([[0.7, 0.0], [0.5, 0.0], [0.0, 0.0]]).reshape(1, 3, 2, 1, 1)
    target = soft_target(shares)
    assert target.shape == (1, 4, 2, 1, 1)
    assert torch.allclose(target.sum(dim=1), torch.ones(1, 2, 1, 1))
    assert target[0, 0, 1].item() == 1.0  # an empty voxel is all background
    assert target[0, 0, 0].item() == 0.0  # over-covered: no background, shares rescaled
    assert target[0, 1, 0].item() == pytest.approx(0.7 / 1.2)


def test_flip_swaps_left_and_right_for_fractions_and_for_values() -> None:
    shape = (12, 10, 8)
    left = np.zeros((3, *shape), dtype=np.float32)
    left[0, 8:] = 1.0  # lung_left on the patient's left (+x, high indices)
    image = np.zeros((1, *shape), dtype=np.float32)
    out = augmentation(_recipe(soft_labels=True))({"image": image, "label": left})
    label = torch.as_tensor(out["label"])
    assert not label[0].any()
    assert label[1, :4].all()  # now right-sided: lung_right
    assert not label[1, 4:].any()
    values = np.zeros((1, *shape), dtype=np.uint8)
    values[0, 8:] = 1
    values[0, :2] = 3
    out = augmentation(_recipe())({"image": image, "label": values})
    flipped = torch.as_tensor(out["label"])[0]
    assert (flipped[:4] == 2).all()
    assert (flipped[-2:] == 3).all()


def _samples(count: int, recipe: Recipe) -> list[Sample]:
    rng = np.random.default_rng(0)
    shape = (14, 12, 9)
    out = []
    for seed in range(count):
        image = rng.random((1, *shape), dtype=np.float32)
        labels = rng.integers(0, 4, (1, *shape)).astype(np.uint8)
        shares = (np.arange(1, 4)[:, None, None, None] == labels).astype(np.uint8) * 255
        out.append(Sample(seed, image, labels, shares))
    return out


def test_loader_processes_draw_their_own_patches_in_the_batch_shape() -> None:
    recipe = _recipe(soft_labels=True, batch_size=2, augmentation={"affine_prob": 1.0})
    samples = _samples(3, recipe)
    batches = patch_batches(samples, recipe, loaders=2, pin=False)
    first, second = next(batches), next(batches)  # one batch from each loader process
    assert first["image"].shape == (2, 1, 12, 10, 8)
    assert first["label"].shape == (2, 3, 12, 10, 8)
    assert first["label"].dtype == torch.float32
    assert not torch.equal(first["image"], second["image"])
    again = next(patch_batches(samples, recipe, loaders=0, pin=False))
    same = next(patch_batches(samples, recipe, loaders=0, pin=False))
    assert torch.equal(again["image"], same["image"])  # seeded: a rerun draws the same patches


def test_asking_for_an_absent_gpu_fails_before_any_work() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_the_recorded_command_repeats_the_run() -> None:
    line = command_line(
        Path("models/recipes/x y.yaml"), Path("/tmp/out"), 4, Path("/tmp/a/model.pt"), "cuda", 14
    )
    assert line == (
        "pacs-node train 'models/recipes/x y.yaml' --out /tmp/out --init /tmp/a/model.pt "
        "--workers 4 --device cuda --loaders 14"
    )
    assert command_line(Path("r.yaml"), None, 1, None, "cpu", 0) == "pacs-node train r.yaml"


def test_a_radiograph_written_without_spacing_trains_as_the_node_will_see_it() -> None:
    """A case written with Pixel Spacing zero or absent reaches the network on the grid the
    runner assumes (the bundle's detector field along the longer side), percentile-scaled."""
    from phantom.render import render_xr

    from pacs_node.training.bundle import inference_config
    from pacs_node.training.dataset import prepare, ranges_for

    recipe = _recipe(
        modality="DX",
        labels=["lung_left", "lung_right"],
        spacing_zyx_mm=[1000.0, 2.0, 2.0],
        patch_xyz=[64, 64, 1],
        intensity={"kind": "percentile", "lower": 1.0, "upper": 99.0},
        unknown_spacing_field_mm=430.0,
        phantom={"xr_anatomy": 1.0, "xr_department": 1.0, "pixel_mm": [2.5, 3.0]},
    )
    ranges = ranges_for(recipe)
    cases = (render_xr(seed, ranges) for seed in range(3000, 3040))
    case = next(c for c in cases if c.settings["spacing"] != "known")
    sample = prepare(case, recipe)
    assert max(sample.image.shape[1:3]) == pytest.approx(430.0 / 2.0, abs=1.5)
    assert float(sample.image.min()) == 0.0
    assert float(sample.image.max()) == 1.0
    scale = inference_config(recipe)["preprocessing"]["transforms"]
    assert any(t.get("_target_") == "ScaleIntensityRangePercentilesd" for t in scale)


def _trained(recipe: Recipe) -> Any:
    from pacs_node.training.trainer import TrainingResult, build_network

    state = build_network(recipe).state_dict()
    labels = dict.fromkeys(recipe.labels, 0.5)
    return TrainingResult(1, 1, 0.5, labels, 0.1, 1, 10, state_dict=state)


def _bundle_recipe(name: str = "t") -> Recipe:
    return _recipe(name=name, network={"channels": [4, 8]}, version="1.1.0")


def test_a_retrained_bundle_keeps_the_gate_limits_marked_for_re_checking(tmp_path: Path) -> None:
    """Weights replacing a bundle, or continuing one of the same model, keep its gate limits
    (and known limits and changelog); the card says they were derived for the earlier weights
    until ``calibrate --write`` derives them anew, which drops that note."""
    import json

    from pacs_node.inference.registry import Registry
    from pacs_node.quality.calibrate import write_limits
    from pacs_node.training.bundle import metadata, write_bundle
    from pacs_node.training.card import render_card

    recipe = _bundle_recipe()
    earlier = metadata(recipe.model_copy(update={"version": "1.0.0"}), _trained(recipe))
    quality = {"sizes": {"liver": {"min": 100.0, "max": 3000.0}}, "pair_ratio_max": 3.0}
    earlier["pacs_node"] |= {"quality": quality, "known_limits": ["no arms"]}
    earlier["changelog"] = {"1.0.0": "first release"}
    root = tmp_path / "models" / "t"
    write_bundle(recipe, _trained(recipe), root, card="", commands=["x"], previous=earlier)
    data = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    node = data["pacs_node"]
    assert node["quality"] == quality
    assert node["known_limits"] == ["no arms"]
    assert data["changelog"] == {"1.0.0": "first release"}
    assert data["version"] == "1.1.0"
    assert "derived for the weights of t 1.0.0" in node["quality_note"]
    assert "derived for the weights of t 1.0.0" in render_card(root)
    loaded = Registry(tmp_path / "models").get("t").quality
    assert loaded.sizes["liver"].max == 3000.0  # the node's gate reads the carried limits
    intensity = {"percentiles": [5.0, 50.0, 95.0], "reference": [0.1, 0.5, 0.9], "tolerance": 0.5}
    write_limits(root, {**quality, "intensity": intensity}, "calibrated")
    node = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))["pacs_node"]
    assert "quality_note" not in node
    assert "derived for the weights" not in render_card(root)


def test_a_bundle_keeps_nothing_from_another_model(tmp_path: Path) -> None:
    """A stage started from another model's weights (CT weights starting the MR model) or from
    one with other labels carries none of its gate limits."""
    import json

    from pacs_node.training.bundle import metadata, write_bundle

    recipe = _bundle_recipe()
    for other in (
        _bundle_recipe(name="ct"),
        _bundle_recipe().model_copy(update={"labels": ("lung_left", "lung_right", "spleen")}),
    ):
        earlier = metadata(other, _trained(other))
        earlier["pacs_node"]["quality"] = {"pair_ratio_max": 3.0}
        earlier["changelog"] = {"1.0.0": "first release"}
        root = tmp_path / other.name / str(len(other.labels))
        write_bundle(recipe, _trained(recipe), root, card="", commands=[], previous=earlier)
        data = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
        assert "quality" not in data["pacs_node"]
        assert "quality_note" not in data["pacs_node"]
        assert "changelog" not in data


def test_a_case_stored_flipped_trains_as_the_same_patient() -> None:
    """A phantom stored with reversed rows or columns (the ``context`` share: feet-first and
    prone series) reaches the network on the LPS grid unchanged, the left lung on the left,
    as the node's loader places it; read as unflipped it would be a mirrored patient whose
    labels teach the network that left and right are interchangeable."""
    from phantom.render import LABEL_VALUE, Case, _flipped

    from pacs_node.training.dataset import prepare

    shape = (10, 20, 24)  # z, y, x
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:, 5:15, 16:22] = LABEL_VALUE["lung_left"]  # +x: the patient's left
    labels[:, 5:15, 2:8] = LABEL_VALUE["lung_right"]
    image = (labels > 0).astype(np.float32)
    image[:, 2:6, 10:14] = 2.0  # something that is not symmetric in y
    case = Case(image, labels, (4.0, 4.0, 4.0), (-46.0, -38.0, 0.0), "MR", 1)
    recipe = _recipe(modality="MR", intensity={"kind": "zscore"}, soft_labels=True)
    plain = prepare(case, recipe)
    left = np.nonzero(plain.labels[0] == 1)[0].mean()
    assert left > np.nonzero(plain.labels[0] == 2)[0].mean()  # (x, y, z): x runs to the left
    for rows, columns in ((True, False), (False, True), (True, True)):
        stored = prepare(_flipped(case, rows, columns), recipe)
        assert np.array_equal(stored.labels, plain.labels), (rows, columns)
        assert np.array_equal(stored.image, plain.image)
        assert stored.fractions is not None
        assert plain.fractions is not None
        assert np.array_equal(stored.fractions, plain.fractions)
