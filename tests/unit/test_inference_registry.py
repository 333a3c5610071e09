"""The registry and runner: a zoo-layout bundle dropped in runs with no code change, labels land
on the source voxels whatever the orientation, and broken bundles are refused by file and key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pacs_node.errors import BundleError, UnknownModel, UnsuitableInput
from pacs_node.imaging.volume import Volume
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner, load_model
from tests.zoo_bundle import TINY_UNET, inference_config, metadata, write_bundle

SPLEEN = {"0": "background", "1": "spleen"}


def make_volume(
    voxels: np.ndarray,
    spacing: tuple[float, float, float],
    direction: np.ndarray,
    modality: str = "CT",
) -> Volume:
    n = voxels.shape[0]
    return Volume(
        voxels=voxels,
        spacing=spacing,
        origin=(12.0, -30.0, 40.0),
        direction=direction,
        sop_instance_uids=tuple(f"1.2.3.{i + 1}" for i in range(n)),
        frame_numbers=(None,) * n,
        headers=(),
        modality=modality,
    )


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    write_bundle(
        models / "spleen_ct_segmentation",
        inference_config(TINY_UNET, roi=(32, 32, 32)),
        metadata(SPLEEN),
    )
    return models


def test_zoo_bundle_runs_through_the_registry(zoo: Path) -> None:
    registry = Registry(zoo)
    bundle = registry.get("spleen_ct_segmentation")
    assert bundle.version == "0.2.0"
    assert bundle.modalities == ("CT",)
    assert [s.name for s in bundle.segments] == ["spleen"]
    assert bundle.patch_size == (32, 32, 32)
    assert bundle.overlap == 0.5
    rng = np.random.default_rng(0)
    volume = make_volume(
        rng.normal(0, 100, (12, 40, 36)).astype(np.int16), (2.5, 0.9, 0.8), np.eye(3)
    )
    runner = Runner(registry, device="cpu")
    first = runner.segment("spleen_ct_segmentation", volume)
    second = runner.segment("spleen_ct_segmentation", volume)
    labels = first.labelmap.labels
    assert labels.shape == volume.shape
    assert set(np.unique(labels).tolist()) <= {0, 1}
    assert np.array_equal(labels, second.labelmap.labels)  # eval mode, deterministic
    assert first.timings.infer > 0
    assert first.timings.preprocess > 0
    # loaded once per process: the second run reuses the same network
    assert load_model(bundle, runner.device) is load_model(bundle, runner.device)
    assert second.timings.load < 0.05


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, 1.0, -1.0]), np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])],
    ids=["axial-LPS", "axial-flipped", "coronal"],
)
def test_labels_land_on_the_source_voxels(tmp_path: Path, direction: np.ndarray) -> None:
    """A bundle whose network thresholds the scaled intensity at 0.5: after the bundle's own
    Orientationd(RAS), Spacingd and ScaleIntensityRanged and the way back, the labels must
    cover the bright off-centre block of the source, not its mirror image."""
    conv = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    k = 40.0
    state = {
        "weight": torch.tensor([-k, k]).reshape(2, 1, 1, 1, 1),
        "bias": torch.tensor([k * 0.5, -k * 0.5]),
    }
    models = tmp_path / "models"
    write_bundle(
        models / "threshold",
        inference_config(conv, pixdim=(1.5, 1.5, 2.0), a_min=-100, a_max=200, roi=(16, 16, 16)),
        metadata({"0": "background", "1": "Liver"}),
        state=state,
    )
    voxels = np.full((24, 40, 48), -100, dtype=np.int16)
    voxels[4:13, 6:20, 8:22] = 200  # off-centre in every axis
    volume = make_volume(voxels, (2.0, 1.5, 1.5), direction)
    result = Runner(Registry(models), device="cpu").segment("threshold", volume)
    labels = result.labelmap.labels
    truth = voxels > 50
    overlap = 2 * np.sum((labels == 1) & truth) / (np.sum(labels == 1) + np.sum(truth))
    assert overlap > 0.9
    assert result.labelmap.segments[0].name == "liver"


def test_wrong_modality_and_too_few_slices_are_refused(zoo: Path) -> None:
    runner = Runner(Registry(zoo), device="cpu")
    mr = make_volume(np.zeros((12, 16, 16), np.int16), (2.0, 1.0, 1.0), np.eye(3), "MR")
    with pytest.raises(UnsuitableInput, match="takes CT; this series is MR"):
        runner.segment("spleen_ct_segmentation", mr)
    thin = make_volume(np.zeros((3, 16, 16), np.int16), (2.0, 1.0, 1.0), np.eye(3))
    with pytest.raises(UnsuitableInput, match="at least 8 slices"):
        runner.segment("spleen_ct_segmentation", thin)
    with pytest.raises(UnknownModel, match="spleen_ct_segmentation"):
        runner.segment("no-such-model", thin)


def _edit(meta: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    edited = copy.deepcopy(meta)
    node = edited
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return edited


_DELETE = object()
CHANNELS = "network_data_format.outputs.pred.channel_def"


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("version", _DELETE, "version"),
        (CHANNELS, _DELETE, CHANNELS),
        (CHANNELS, {"0": "background", "1": "pancreas"}, f"{CHANNELS}.1"),
        (CHANNELS, {"0": "spleen", "1": "background"}, f"{CHANNELS}.0"),
        (CHANNELS, {"0": "background", "2": "spleen"}, CHANNELS),
        ("pacs_node.modalities", "CT", "pacs_node.modalities"),
        ("pacs_node.kind", "magic", "pacs_node.kind"),
        ("pacs_node.preprocessing", {"orientation": "XYZ"}, "pacs_node.preprocessing.orientation"),
        (
            "pacs_node.preprocessing",
            {"unknown_spacing_field_mm": 0},
            "pacs_node.preprocessing.unknown_spacing_field_mm",
        ),
        (
            "pacs_node.preprocessing",
            {"intensity": {"kind": "percentile", "lower": 99, "upper": 1}},
            "pacs_node.preprocessing.intensity",
        ),
        (
            "pacs_node.preprocessing",
            {"intensity": {"kind": "percentile", "upper": 101}},
            "pacs_node.preprocessing.intensity.upper",
        ),
        ("pacs_node.labels", {"1": "pancreas"}, "pacs_node.labels.1"),
        ("pacs_node.labels", {"5": "liver"}, "pacs_node.labels.5"),
        ("pacs_node.cleanup", {"1": {"shrink": True}}, "pacs_node.cleanup.1.shrink"),
        ("pacs_node.queue", "GPU queue!", "pacs_node.queue"),
    ],
)
def test_broken_metadata_is_refused_with_file_and_key(
    tmp_path: Path, path: str, value: Any, key: str
) -> None:
    root = tmp_path / "broken"
    meta = _edit(metadata(SPLEEN), path, value)
    write_bundle(root, inference_config(TINY_UNET), meta)
    with pytest.raises(BundleError) as info:
        Registry(tmp_path).load_all()
    assert info.value.source == str(root / "configs" / "metadata.json")
    assert info.value.key == key


def test_unparseable_metadata_names_the_line(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    write_bundle(root, inference_config(TINY_UNET), metadata(SPLEEN))
    (root / "configs" / "metadata.json").write_text('{"version": "1",\n "task": }')
    with pytest.raises(BundleError, match=r"metadata.json: line 2 column \d+: not valid JSON"):
        Registry(tmp_path).get("broken")


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", inference_config(TINY_UNET), metadata(SPLEEN))
    (root / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match="no weights"):
        Registry(tmp_path).get("b")


def test_zoo_label_names_map_onto_the_vocabulary_and_overrides_code_new_ones(
    tmp_path: Path,
) -> None:
    channels = {"0": "background", "1": "Left Kidney", "2": "right-lung", "3": "pancreas"}
    meta = metadata(channels)
    meta["pacs_node"] = {
        "labels": {"3": {"name": "pancreas", "type": ["15776009", "Pancreas"], "color": [1, 2, 3]}}
    }
    write_bundle(tmp_path / "multi", inference_config(TINY_UNET), meta)
    bundle = Registry(tmp_path).get("multi")
    names = [(s.value, s.name) for s in bundle.segments]
    assert names == [(1, "kidney_left"), (2, "lung_right"), (3, "pancreas")]
    pancreas = bundle.segments[2].structure
    assert (pancreas.type.value, pancreas.type.scheme, pancreas.color) == (
        "15776009",
        "SCT",
        (1, 2, 3),
    )
    listed = bundle.as_json()
    assert listed["labels"][0]["type"]["modifier"]["meaning"] == "Left"
    json.dumps(listed)  # serialisable as the CLI prints it


def test_node_recipe_replaces_the_bundle_preprocessing(tmp_path: Path) -> None:
    conv = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    state = {
        "weight": torch.tensor([-40.0, 40.0]).reshape(2, 1, 1, 1, 1),
        "bias": torch.tensor([20.0, -20.0]),
    }
    meta = metadata({"0": "background", "1": "bone"})
    meta["pacs_node"] = {
        "preprocessing": {
            "spacing_zyx_mm": [3.0, 2.0, 2.0],
            "orientation": "RAS",
            "intensity": {"kind": "window", "center": 100, "width": 400},
        },
        "patch_size": [16, 16, 16],
        "cleanup": {"1": {"largest_component": True}},
    }
    write_bundle(tmp_path / "recipe", inference_config(conv), meta, state=state)
    voxels = np.full((20, 32, 32), -200, dtype=np.int16)
    voxels[5:12, 4:14, 18:28] = 300
    voxels[16, 30, 30] = 300  # a lone voxel: removed by the largest-component clean-up
    volume = make_volume(voxels, (2.5, 1.2, 1.2), np.diag([1.0, -1.0, -1.0]))
    labels = Runner(Registry(tmp_path), device="cpu").segment("recipe", volume).labelmap.labels
    truth = voxels > 100
    truth[16, 30, 30] = False
    overlap = 2 * np.sum((labels == 1) & truth) / (np.sum(labels == 1) + np.sum(truth))
    assert overlap > 0.85
    assert labels[16, 30, 30] == 0


def test_repository_models_load() -> None:
    models = Path(__file__).resolve().parents[2] / "models"
    bundles = {b.name: b for b in Registry(models).load_all()}
    classical = bundles["ct-classical"]
    assert [s.name for s in classical.segments] == ["body", "lung_left", "lung_right", "bone"]
    assert classical.model_card is not None
    assert classical.queue == "cpu"  # no pacs_node.queue: the default device class


def test_a_bundle_names_the_device_class_that_runs_it(tmp_path: Path) -> None:
    meta = _edit(metadata(SPLEEN), "pacs_node.queue", "gpu")
    write_bundle(tmp_path / "spleen", inference_config(TINY_UNET), meta)
    assert Registry(tmp_path).get("spleen").queue == "gpu"


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, 1.0, -1.0]), np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])],
    ids=["axial-LPS", "axial-flipped", "sagittal"],
)
def test_the_network_sees_ras(tmp_path: Path, direction: np.ndarray) -> None:
    """Zoo networks were trained on RAS arrays (x index growing to the patient's right). A
    network marking where intensity rises along x marks the block's face on the patient's
    left; fed LPS (or the source's own axes) it would mark another face."""
    conv = {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": [3, 1, 1],
        "padding": [1, 0, 0],
    }
    k = 40.0
    weight = torch.zeros(2, 1, 3, 1, 1)
    weight[1, 0, :, 0, 0] = torch.tensor([-k, 0.0, k])
    state = {"weight": weight, "bias": torch.tensor([0.0, -0.25 * k])}
    models = tmp_path / "models"
    write_bundle(
        models / "edge",
        inference_config(conv, pixdim=(1.5, 1.5, 1.5), a_min=-100, a_max=200, roi=(16, 16, 16)),
        metadata({"0": "background", "1": "bone"}),
        state=state,
    )
    voxels = np.full((30, 30, 30), -100, dtype=np.int16)
    voxels[8:22, 8:22, 8:22] = 200
    volume = make_volume(voxels, (1.5, 1.5, 1.5), direction)
    labels = Runner(Registry(models), device="cpu").segment("edge", volume).labelmap.labels
    block = volume.index_to_patient(np.argwhere(voxels > 0))
    marked = volume.index_to_patient(np.argwhere(labels == 1))
    assert len(marked) > 50
    left_face = block[:, 0].max()  # LPS: +x is the patient's left
    assert abs(marked[:, 0].mean() - left_face) < 3.0
    # the other axes: the mark spans the face, centred on the block
    assert np.allclose(marked[:, 1:].mean(axis=0), block[:, 1:].mean(axis=0), atol=2.0)


def test_a_percentile_intensity_recipe_is_read(tmp_path: Path) -> None:
    meta = _edit(
        metadata(SPLEEN),
        "pacs_node.preprocessing",
        {"intensity": {"kind": "percentile", "lower": 2, "upper": 98}},
    )
    write_bundle(tmp_path / "pct", inference_config(TINY_UNET), meta)
    recipe = Registry(tmp_path).get("pct").preprocessing
    assert recipe is not None
    assert recipe.intensity is not None
    assert (recipe.intensity.kind, recipe.intensity.lower, recipe.intensity.upper) == (
        "percentile",
        2.0,
        98.0,
    )
