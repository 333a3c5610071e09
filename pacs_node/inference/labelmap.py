"""What a model returns and what results writers take: a label array and what each value means."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from pacs_node.inference.vocabulary import Structure


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a result, as DICOM (Contributing Equipment, SEG algorithm
    identification) and FHIR (Device) name it."""

    name: str
    version: str
    family: str = "Artificial Intelligence"  # CID 7162: ArtificialIntelligence or others
    manufacturer: str = "pacs-node"
    description: str = ""


@dataclass(frozen=True)
class SegmentSpec:
    """One label value of a Labelmap: which structure it is, under the vocabulary's codes."""

    value: int
    structure: Structure

    @property
    def name(self) -> str:
        return self.structure.name


@dataclass(frozen=True)
class ModelInfo:
    """A bundle as results need it: identity, modalities and its segments."""

    algorithm: Algorithm
    modalities: tuple[str, ...]
    segments: tuple[SegmentSpec, ...]
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Labelmap:
    """Integer labels on a Volume's grid (z, y, x); 0 is background."""

    labels: NDArray[np.integer]
    segments: tuple[SegmentSpec, ...]
    # Optional per-segment probabilities on the same grid (value -> float array 0..1), for
    # FRACTIONAL SEG; absent when the model only gives labels.
    probabilities: dict[int, NDArray[np.floating]] | None = None

    def __post_init__(self) -> None:
        values = [s.value for s in self.segments]
        if len(set(values)) != len(values) or any(v <= 0 for v in values):
            raise ValueError("segment values must be unique positive integers")
        if self.labels.ndim != 3:
            raise ValueError("labels must be a (z, y, x) array")

    def segment(self, value: int) -> SegmentSpec:
        for spec in self.segments:
            if spec.value == value:
                return spec
        raise KeyError(value)

    def mask(self, value: int) -> NDArray[np.bool_]:
        return np.asarray(self.labels == value)
