"""Training targets: label fractions that keep each organ's volume and place its edge inside a
coarse voxel, and augmentation that moves them (and swaps left and right) like label values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pacs_node.imaging.volume import Grid
from pacs_node.training.dataset import label_fractions
from pacs_node.training.recipe import Recipe
from pacs_node.training.trainer import augmentation, soft_target


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
