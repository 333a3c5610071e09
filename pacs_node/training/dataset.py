"""Phantom cases on a model's grid, prepared exactly as the runner prepares a series.

The image goes through :func:`pacs_node.imaging.preprocess.target_grid` / ``resample`` and the
bundle's intensity recipe, so what the network sees in training is what it sees in the node.
Arrays come out in the network's (x, y, z) order with a channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray
from phantom.render import DEFAULTS, Case, Ranges, modality_key, render

from pacs_node.imaging import preprocess
from pacs_node.imaging.volume import Grid
from pacs_node.training.recipe import Intensity, Recipe


@dataclass(frozen=True)
class Sample:
    """One case on the model grid: image (1, x, y, z) float32, labels (1, x, y, z) uint8."""

    seed: int
    image: NDArray[np.float32]
    labels: NDArray[np.uint8]


def ranges_for(recipe: Recipe) -> Ranges:
    """The phantom's training ranges with the recipe's overrides."""
    known = {f.name for f in fields(Ranges)}
    values = {k: tuple(v) for k, v in recipe.phantom.items() if k in known}
    unknown = set(recipe.phantom) - known
    if unknown:
        raise ValueError(f"unknown phantom ranges: {', '.join(sorted(unknown))}")
    base = DEFAULTS[modality_key(recipe.modality)]
    return Ranges(**{**{f.name: getattr(base, f.name) for f in fields(Ranges)}, **values})


def apply_intensity(voxels: NDArray[np.float32], intensity: Intensity) -> NDArray[np.float32]:
    if intensity.kind == "range":
        return preprocess.scale_intensity_range(voxels, intensity.a_min, intensity.a_max)
    return preprocess.zscore(voxels)


def label_lookup(case: Case, labels: tuple[str, ...]) -> NDArray[np.uint8]:
    """Phantom label value -> recipe channel (0 for structures the recipe leaves out)."""
    lookup = np.zeros(256, dtype=np.uint8)
    channel = {name: i + 1 for i, name in enumerate(labels)}
    for value, name in case.label_names.items():
        lookup[value] = channel.get(name, 0)
    return lookup


def case_grid(case: Case) -> Grid:
    return Grid.from_geometry(case.labels.shape, case.spacing, case.origin, np.eye(3))


def prepare(case: Case, recipe: Recipe) -> Sample:
    """Resample a rendered case onto the recipe's grid (image trilinear, labels nearest)."""
    source = case_grid(case)
    target = preprocess.target_grid(source, recipe.spacing_zyx_mm, "LPS")
    fill = float(case.image.min())
    image = preprocess.resample(case.image, source, target, order=1, fill=fill, dtype=np.float32)
    labels = label_lookup(case, recipe.labels)[case.labels]
    labels = preprocess.resample(labels, source, target, order=0, fill=0)
    image = apply_intensity(image, recipe.intensity)
    return Sample(
        case.seed,
        np.ascontiguousarray(image.transpose(2, 1, 0)[None]),
        np.ascontiguousarray(labels.transpose(2, 1, 0)[None]),
    )


def make_sample(seed: int, recipe: Recipe) -> Sample:
    return prepare(render(recipe.modality, seed, ranges_for(recipe)), recipe)
