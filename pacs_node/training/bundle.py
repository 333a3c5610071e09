"""A trained network as a bundle in the registry's layout (MONAI bundle plus the node's optional
``pacs_node`` keys), so it loads through :mod:`pacs_node.inference.registry` like any zoo
bundle."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from pacs_node.training.recipe import Recipe
from pacs_node.training.trainer import TrainingResult, network_args

NOT_CLINICAL = (
    "**Not for clinical use until validated locally with `pacs-node evaluate`** on the "
    "hospital's own labelled cases. It was trained on procedural phantoms only."
)

SCHEDULE = "warm-up, then cosine decay over the epochs or the time budget"

# what a maintainer or the gate's calibration wrote into a bundle's metadata, not training:
# kept when a run replaces the bundle or continues one of the same model
CARRIED = ("quality", "known_limits")
QUALITY_NOTE = (
    "These limits were derived for the weights of {name} {version}, which these weights "
    "replace: re-check them with `python -m pacs_node.quality.calibrate {name} ... --check` "
    "and derive them anew with `--write` (see that module) before relying on the gate."
)


def metadata(recipe: Recipe, result: TrainingResult) -> dict[str, Any]:
    """configs/metadata.json: MONAI's standard keys plus ``pacs_node``."""
    import monai

    labels = {"0": "background", **{str(i + 1): n for i, n in enumerate(recipe.labels)}}
    intensity: dict[str, Any] = {"kind": recipe.intensity.kind}
    if recipe.intensity.kind == "range":
        intensity |= {"a_min": recipe.intensity.a_min, "a_max": recipe.intensity.a_max}
    if recipe.intensity.kind == "percentile":
        intensity |= {"lower": recipe.intensity.lower, "upper": recipe.intensity.upper}
    cleanup = {str(recipe.labels.index(name) + 1): steps for name, steps in recipe.cleanup.items()}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": recipe.version,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": {},
        "name": recipe.name,
        "task": recipe.description or f"{recipe.modality} segmentation",
        "description": recipe.description,
        "authors": "pacs-node",
        "copyright": "Apache-2.0",
        "data_source": "procedural phantoms (models/phantom), seeds "
        f"{recipe.train_seeds[0]}..{recipe.train_seeds[1] - 1}",
        "intended_use": "research; not for clinical use until validated locally",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if recipe.modality == "CT" else "magnitude",
                    "modality": "/".join(recipe.accepted_modalities),
                    "num_channels": 1,
                    "spatial_shape": list(recipe.patch_xyz),
                    "dtype": "float32",
                    "value_range": [0, 1] if recipe.intensity.kind != "zscore" else [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(labels),
                    "spatial_shape": list(recipe.patch_xyz),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": labels,
                }
            },
        },
        "pacs_node": {
            "kind": "network",
            "modalities": list(recipe.accepted_modalities),
            "min_slices": 1 if recipe.network.two_d else 8,
            "preprocessing": {
                "spacing_zyx_mm": list(recipe.spacing_zyx_mm),
                "orientation": "LPS",
                "intensity": intensity,
                **(
                    {"unknown_spacing_field_mm": recipe.unknown_spacing_field_mm}
                    if recipe.unknown_spacing_field_mm
                    else {}
                ),
            },
            "patch_size": list(recipe.patch_xyz),
            "overlap": 0.25,
            "sw_batch_size": 1,
            "cleanup": cleanup,
            **({"anatomy": dict(recipe.anatomy)} if recipe.anatomy else {}),
            "training": {
                "recipe": recipe.model_dump(mode="json"),
                "schedule": SCHEDULE,
                "initialised_from": result.init,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "val_dice": round(result.best_val_dice, 4),
                "val_dice_per_label": {
                    k: round(v, 4) for k, v in result.val_dice_per_label.items()
                },
                "minutes": round(result.minutes, 1),
                "parameters": result.parameters,
                "machine": result.machine or f"{platform.machine()} CPU, {recipe.threads} threads",
            },
        },
    }


def inference_config(recipe: Recipe) -> dict[str, Any]:
    """configs/inference.json: the network, the zoo-style preprocessing (for MONAI tools; the
    node uses ``pacs_node.preprocessing`` instead) and the sliding-window inferer."""
    xyz = list(reversed(recipe.spacing_zyx_mm))
    if recipe.intensity.kind == "range":
        scale: dict[str, Any] = {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": recipe.intensity.a_min,
            "a_max": recipe.intensity.a_max,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    elif recipe.intensity.kind == "percentile":
        scale = {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": recipe.intensity.lower,
            "upper": recipe.intensity.upper,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    else:
        scale = {"_target_": "NormalizeIntensityd", "keys": "image"}
    return {
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_args(recipe),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": xyz, "mode": "bilinear"},
                scale,
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(recipe.patch_xyz),
            "sw_batch_size": 1,
            "overlap": 0.25,
            "mode": "gaussian",
        },
    }


def carry_over(data: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with what ``previous`` (the metadata of the bundle being replaced, or of the
    one the weights started from) holds beyond training: the gate's limits (marked as derived
    for the earlier weights), known limits and the changelog. Nothing from another model (a
    CT stage that starts an MR one) or from one with other labels."""
    if not previous or previous.get("name") != data["name"]:
        return data
    labels = data["network_data_format"]["outputs"]["pred"]["channel_def"]
    earlier = previous.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    if earlier.get("channel_def") != labels:
        return data
    node = previous.get("pacs_node", {})
    for key in CARRIED:
        if key in node:
            data["pacs_node"][key] = node[key]
    if "quality" in node:
        data["pacs_node"]["quality_note"] = node.get("quality_note") or QUALITY_NOTE.format(
            name=previous["name"], version=previous.get("version", "")
        )
    if previous.get("changelog"):
        data["changelog"] = dict(previous["changelog"])
    return data


def earlier_stages(init: Path | None, root: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The commands of the stages that made the ``--init`` weights (listed before this one's),
    and the metadata whose gate limits carry over: the bundle being replaced, else the one
    continued."""
    metadata = init.parent.parent / "configs" / "metadata.json" if init is not None else None
    started: dict[str, Any] | None = None
    commands: list[str] = []
    if metadata is not None and metadata.is_file():
        started = json.loads(metadata.read_text(encoding="utf-8"))
        commands = list(started["pacs_node"]["training"].get("commands", []))
    replaced = root / "configs" / "metadata.json"
    if replaced.is_file():
        return commands, json.loads(replaced.read_text(encoding="utf-8"))
    return commands, started


def write_bundle(
    recipe: Recipe,
    result: TrainingResult,
    root: Path,
    card: str,
    commands: list[str],
    previous: dict[str, Any] | None = None,
) -> Path:
    """Write configs/, models/model.pt and docs/README.md under ``root``; ``commands`` are the
    command lines that produced the weights (earlier stages first); ``previous`` is the
    metadata whose gate limits, known limits and changelog the bundle keeps (see
    :func:`carry_over`)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    data = carry_over(metadata(recipe, result), previous)
    data["pacs_node"]["training"]["commands"] = commands
    meta = json.dumps(data, indent=2) + "\n"
    (root / "configs" / "metadata.json").write_text(meta, encoding="utf-8")
    infer = json.dumps(inference_config(recipe), indent=2) + "\n"
    (root / "configs" / "inference.json").write_text(infer, encoding="utf-8")
    torch.save(result.state_dict, root / "models" / "model.pt")
    (root / "docs" / "README.md").write_text(card, encoding="utf-8")
    return root
