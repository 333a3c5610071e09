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
from scipy import ndimage  # type: ignore[import-untyped,unused-ignore]

from pacs_node.imaging import preprocess
from pacs_node.imaging.volume import Grid
from pacs_node.training.recipe import Intensity, Recipe


@dataclass(frozen=True)
class Sample:
    """One case on the model grid: image (1, x, y, z) float32, labels (1, x, y, z) uint8 and,
    for a recipe with ``soft_labels``, fractions (labels, x, y, z) uint8 (255 = whole voxel)."""

    seed: int
    image: NDArray[np.float32]
    labels: NDArray[np.uint8]
    fractions: NDArray[np.uint8] | None = None


def ranges_for(recipe: Recipe) -> Ranges:
    """The phantom's training ranges with the recipe's overrides."""
    known = {f.name for f in fields(Ranges)}
    values = {
        k: tuple(v) if isinstance(v, list | tuple) else v
        for k, v in recipe.phantom.items()
        if k in known
    }
    unknown = set(recipe.phantom) - known
    if unknown:
        raise ValueError(f"unknown phantom ranges: {', '.join(sorted(unknown))}")
    base = DEFAULTS[modality_key(recipe.modality)]
    return Ranges(**{**{f.name: getattr(base, f.name) for f in fields(Ranges)}, **values})


def apply_intensity(voxels: NDArray[np.float32], intensity: Intensity) -> NDArray[np.float32]:
    if intensity.kind == "range":
        return preprocess.scale_intensity_range(voxels, intensity.a_min, intensity.a_max)
    if intensity.kind == "percentile":
        return preprocess.percentile_scale(voxels, intensity.lower, intensity.upper)
    return preprocess.zscore(voxels)


def label_lookup(case: Case, labels: tuple[str, ...]) -> NDArray[np.uint8]:
    """Phantom label value -> recipe channel (0 for structures the recipe leaves out)."""
    lookup = np.zeros(256, dtype=np.uint8)
    channel = {name: i + 1 for i, name in enumerate(labels)}
    for value, name in case.label_names.items():
        lookup[value] = channel.get(name, 0)
    return lookup


def case_direction(case: Case) -> NDArray[np.float64]:
    """The case's axes as its DICOM files give them (columns x, rows y, slices z): a series
    stored with flipped rows or columns runs along -y or -x, so the patient's left stays
    where it is on the model's LPS grid, as the node's loader places it."""
    rows, columns = case.flips
    return np.diag([-1.0 if columns else 1.0, -1.0 if rows else 1.0, 1.0])


def case_grid(case: Case) -> Grid:
    return Grid.from_geometry(case.labels.shape, case.spacing, case.origin, case_direction(case))


def label_fractions(
    channels: NDArray[np.uint8], count: int, source: Grid, target: Grid
) -> NDArray[np.uint8]:
    """The share of each target voxel that labels 1..``count`` cover (0..255), averaged from
    the source-resolution labels. A coarse voxel on an organ's edge is part organ: trained on
    these partial-volume targets the network places a boundary inside the voxel, which the
    runner's probability upsampling then keeps; nearest-neighbour labels cap Dice below that.
    """
    ratio = np.asarray(target.spacing) / np.asarray(source.spacing)
    sigma = np.where(ratio > 1, ratio / np.sqrt(12.0), 0.0)  # the variance of a box average
    out = np.zeros((count, *target.shape), dtype=np.uint8)
    for value in range(1, count + 1):
        mask = channels == value
        if not mask.any():
            continue
        share = ndimage.gaussian_filter(mask.astype(np.float32), sigma, mode="nearest")
        share = preprocess.resample(share, source, target, order=1, fill=0.0)
        out[value - 1] = np.rint(np.clip(share, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def prepare(case: Case, recipe: Recipe) -> Sample:
    """Resample a rendered case onto the recipe's grid (image trilinear, labels nearest, and
    label fractions when the recipe trains on them)."""
    source = case_grid(case)
    field = recipe.unknown_spacing_field_mm
    if field and case.settings.get("spacing") in ("zero", "missing"):
        # written without a usable spacing: the network gets what the node's runner assumes
        pixel = field / max(case.labels.shape[1:])
        source = Grid.from_geometry(
            case.labels.shape, (case.spacing[0], pixel, pixel), case.origin, case_direction(case)
        )
    target = preprocess.target_grid(source, recipe.spacing_zyx_mm, "LPS")
    fill = float(case.image.min())
    image = preprocess.resample(case.image, source, target, order=1, fill=fill, dtype=np.float32)
    channels = label_lookup(case, recipe.labels)[case.labels]
    labels = preprocess.resample(channels, source, target, order=0, fill=0)
    fractions = None
    if recipe.soft_labels:
        shares = label_fractions(channels, len(recipe.labels), source, target)
        fractions = np.ascontiguousarray(shares.transpose(0, 3, 2, 1))
    image = apply_intensity(image, recipe.intensity)
    return Sample(
        case.seed,
        np.ascontiguousarray(image.transpose(2, 1, 0)[None]),
        np.ascontiguousarray(labels.transpose(2, 1, 0)[None]),
        fractions,
    )


def make_sample(seed: int, recipe: Recipe) -> Sample:
    return prepare(render(recipe.modality, seed, ranges_for(recipe)), recipe)
