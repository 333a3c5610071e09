"""The gate's limits and modes, as config: a bundle's ``configs/metadata.json`` key
``pacs_node.quality`` gives a model's defaults, a route's ``qa_limits`` (routes.yaml) overrides
them key by key (a mapping such as ``sizes`` is merged per label).

Every limit is optional; a check without a limit is not run. Sizes are millilitres for 3D
series and square centimetres for single images (radiographs), the units the report shows.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QUALITY_KEY = "quality"  # under the bundle's "pacs_node" object


class QaMode(StrEnum):
    """What a route does with a result that fails the gate (routes.yaml ``qa``)."""

    HOLD = "hold"  # nothing sent until an operator releases or rejects it
    FLAG = "flag"  # sent, with the failed checks named in the SR, PDF and FHIR report
    OFF = "off"  # no gate


class SizeRange(BaseModel):
    """A normal range, both ends inclusive, either optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = Field(default=None, ge=0)
    max: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if len(value) != 2:
                raise ValueError("give [min, max]")
            return {"min": value[0], "max": value[1]}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SizeRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is larger than max")
        return self

    def text(self) -> str:
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        return f"[{low}, {high}]"


class Order(BaseModel):
    """``upper``'s centroid lies superior to (cranial of) ``lower``'s (3D series only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upper: str = Field(min_length=1)
    lower: str = Field(min_length=1)


class Intensity(BaseModel):
    """The input's intensity percentiles inside the body (or the whole image without a body
    label) against those of the training renders: each percentile may lie at most
    ``tolerance`` from the reference (HU on CT; on other modalities the percentiles are of
    the image scaled to its own 1st-99th percentile range, so only the shape counts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percentiles: tuple[float, ...] = Field(min_length=1)
    reference: tuple[float, ...] = Field(min_length=1)
    tolerance: float = Field(gt=0)
    source: str = ""  # the command that computed the reference

    @model_validator(mode="after")
    def _same_length(self) -> Intensity:
        if len(self.percentiles) != len(self.reference):
            raise ValueError("percentiles and reference must have the same length")
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError("percentiles lie within [0, 100]")
        return self


class QualityLimits(BaseModel):
    """One model's limits (see the README's quality gate section for each check)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # label name -> normal volume (mL, 3D) or area (cm2, single images with a known spacing)
    sizes: dict[str, SizeRange] = Field(default_factory=dict)
    # a left/right pair (name_left, name_right): the larger size over the smaller at most this
    pair_ratio_max: float | None = Field(default=None, gt=1)
    # label name -> the side of the patient's midline its centroid must lie on
    sides: dict[str, Literal["left", "right"]] = Field(default_factory=dict)
    order: tuple[Order, ...] = ()
    # label name -> most separate pieces accepted
    max_components: dict[str, int] = Field(default_factory=dict)
    # 3D: a label found in fewer slices than this (of a series with at least 4 times as many)
    min_slices: int | None = Field(default=None, ge=1)
    # any label but the body covering more than this fraction of the whole image
    max_image_fraction: float | None = Field(default=None, gt=0, le=1)
    intensity: Intensity | None = None


def merge_limits(base: QualityLimits, override: dict[str, Any] | None) -> QualityLimits:
    """``base`` with a route's overrides: mappings merged per key, other values replaced."""
    if not override:
        return base
    data = base.model_dump(mode="json", exclude_none=True)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return QualityLimits.model_validate(data)


def limits_from_metadata(metadata: dict[str, Any]) -> QualityLimits:
    """A bundle's limits (``pacs_node.quality``); none given: no limits, only the checks that
    need none (a side on the wrong side of the patient)."""
    node = metadata.get("pacs_node")
    raw = node.get(QUALITY_KEY) if isinstance(node, dict) else None
    return QualityLimits.model_validate(raw or {})


def limit_labels(raw: dict[str, Any] | QualityLimits) -> set[str]:
    """The label names limits speak of (to check them against a model's labels)."""
    limits = raw if isinstance(raw, QualityLimits) else merge_limits(QualityLimits(), raw)
    names = {*limits.sizes, *limits.sides, *limits.max_components}
    return names | {n for o in limits.order for n in (o.upper, o.lower)}
