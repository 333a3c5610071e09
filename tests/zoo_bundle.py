"""MONAI Model Zoo style bundles written by tests (and the benchmark): the layout and config
keys of the zoo's spleen_ct_segmentation, with weights saved from a seeded initialisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from monai.bundle.config_parser import ConfigParser

SPLEEN_LIKE_UNET: dict[str, Any] = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}
TINY_UNET: dict[str, Any] = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


def inference_config(
    network_def: dict[str, Any],
    *,
    pixdim: tuple[float, float, float] = (1.5, 1.5, 2.0),
    a_min: float = -57.0,
    a_max: float = 164.0,
    roi: tuple[int, int, int] = (96, 96, 96),
) -> dict[str, Any]:
    """inference.json as the zoo writes it: LoadImaged first, RAS, Spacingd, intensity."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": list(pixdim),
                    "mode": "bilinear",
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": a_min,
                    "a_max": a_max,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(roi),
            "sw_batch_size": 4,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }


def metadata(channel_def: dict[str, str], modality: str = "CT") -> dict[str, Any]:
    """metadata.json with the zoo's standard keys only (no node section)."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.2.0",
        "changelog": {"0.2.0": "unify naming"},
        "monai_version": "0.9.0",
        "pytorch_version": "1.10.0",
        "numpy_version": "1.21.2",
        "task": "Decathlon spleen segmentation",
        "description": "A pre-trained model for volumetric (3D) segmentation of the spleen from CT",
        "authors": "MONAI team",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": modality,
                    "num_channels": 1,
                    "spatial_shape": [96, 96, 96],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(channel_def),
                    "spatial_shape": [96, 96, 96],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                }
            },
        },
    }


def write_bundle(
    root: Path,
    config: dict[str, Any],
    meta: dict[str, Any],
    *,
    seed: int = 0,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write configs, a model card and ``models/model.pt`` (the network_def's seeded
    initialisation unless ``state`` is given)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (root / "docs" / "README.md").write_text("# Test bundle\n\nRandom weights; not a model.\n")
    if state is None:
        torch.manual_seed(seed)
        parser = ConfigParser(config)
        network = parser.get_parsed_content("network_def")
        state = network.state_dict()
    torch.save(state, root / "models" / "model.pt")
    return root
