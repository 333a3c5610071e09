"""A training recipe: everything that decides a model, read from one YAML or JSON file and
validated when it loads, so a typo fails before minutes of case generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from pacs_node.errors import ConfigError
from pacs_node.inference.vocabulary import BY_NAME

Positive = Annotated[float, Field(gt=0)]


class Intensity(BaseModel):
    """The node-side intensity recipe written into the bundle (registry ``intensity``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["range", "zscore", "percentile"]
    a_min: float = -1000.0
    a_max: float = 1000.0
    lower: float = Field(1.0, ge=0, le=100)  # percentile: of the image's own values
    upper: float = Field(99.0, ge=0, le=100)

    @model_serializer(mode="wrap")
    def _only_what_the_kind_reads(self, handler: SerializerFunctionWrapHandler) -> Any:
        """The percentiles only for the kind that reads them, so a bundle's recorded recipe
        stays what it was for the other kinds."""
        data = handler(self)
        if self.kind != "percentile" and isinstance(data, dict):
            data.pop("lower", None)
            data.pop("upper", None)
        return data


class Network(BaseModel):
    """A MONAI UNet: small, fast on CPU, and anisotropic strides give a 2D model on one slice."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = Field(1, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    two_d: bool = False  # kernels (3, 3, 1) and strides (2, 2, 1): the z axis is one slice


class Augmentation(BaseModel):
    """Probabilities and ranges of the random transforms applied to each training patch."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rotate_deg: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0, lt=1)
    affine_prob: float = Field(0.5, ge=0, le=1)
    elastic_prob: float = Field(0.0, ge=0, le=1)
    flip_prob: float = Field(0.0, ge=0, le=1)  # left-right, with left/right labels swapped
    intensity_prob: float = Field(0.5, ge=0, le=1)
    noise_std: float = Field(0.03, ge=0)


class Recipe(BaseModel):
    """What ``pacs-node train`` reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = "1.0.0"
    description: str = ""
    modality: Literal["CT", "MR", "DX"]
    modalities: tuple[str, ...] = ()  # accepted at inference; default: (modality,)
    labels: tuple[str, ...]
    spacing_zyx_mm: tuple[Positive, Positive, Positive]
    # a 2D image without a usable pixel spacing is taken to span this many mm along its longer
    # side, for resampling to the model grid only (never for a size): None refuses no image but
    # resamples it as 1 mm pixels
    unknown_spacing_field_mm: Positive | None = None
    patch_xyz: tuple[int, int, int]
    intensity: Intensity
    network: Network = Network()
    augmentation: Augmentation = Augmentation()
    train_seeds: tuple[int, int]  # [first, last) phantom seeds used for training
    val_seeds: tuple[int, int]
    epochs: int = Field(50, ge=1)
    steps_per_epoch: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    patience: int = Field(8, ge=1)  # epochs without a better validation Dice before stopping
    max_minutes: float = Field(28.0, gt=0)  # rendering included
    threads: int = Field(2, ge=1)
    seed: int = 0
    # Ranges overrides: (low, high) ranges, or a share for the radiograph realism fields
    phantom: dict[str, tuple[float, float] | float] = Field(default_factory=dict)
    # train on the share of each model voxel every label covers instead of nearest labels
    soft_labels: bool = False
    cleanup: dict[str, dict[str, float | bool]] = Field(default_factory=dict)
    # anatomical limits before the clean-up (the bundle's pacs_node.anatomy, label names)
    anatomy: dict[str, str | bool | float | list[str]] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _known(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in labels if n not in BY_NAME]
        if unknown:
            raise ValueError(f"not in the vocabulary: {', '.join(unknown)}")
        if len(set(labels)) != len(labels):
            raise ValueError("labels repeat")
        return labels

    @field_validator("train_seeds", "val_seeds")
    @classmethod
    def _range(cls, seeds: tuple[int, int]) -> tuple[int, int]:
        if seeds[1] <= seeds[0]:
            raise ValueError("seed range [first, last) is empty")
        return seeds

    @property
    def accepted_modalities(self) -> tuple[str, ...]:
        return self.modalities or (self.modality,)


def load_recipe(path: Path) -> Recipe:
    """Parse a YAML or JSON recipe; ConfigError names the file, the key and the reason."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc}") from exc
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(str(path), key, first["msg"]) from exc
    overlap = set(range(*recipe.train_seeds)) & set(range(*recipe.val_seeds))
    if overlap:
        raise ConfigError(str(path), "val_seeds", "overlaps train_seeds")
    return recipe
