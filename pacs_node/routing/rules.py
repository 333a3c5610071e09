"""The routing rule grammar (``ae_config/routes.yaml``) and its evaluation, with explanations.

A rule matches a study when at least one of its series satisfies every condition of ``when``;
``select`` then picks the series to process among those that matched. Conditions::

    modality: CT                      a string is a regular expression that must match the WHOLE
                                      value (CT does not match "CTA LOCALIZER"); case-sensitive
                                      unless the pattern says (?i)
    calling_ae: [CT1, CT2]            a list: any one of the patterns
    series_description: {not: "(?i).*(localizer|scout|topogram).*"}
                                      {match: P} or {not: P}; both together mean "P and not Q"
    image_type: {contains: AXIAL}     multi-valued attributes (image_type, body_region): one value
    body_region: {contains: CHEST}    must fully match; {not_contains: P}: no value may
    slices: {min: 20, max: 2000}      numeric ranges, both ends inclusive, either optional;
    slice_thickness: {max: 5.0}       ``not: true`` inverts a range

A missing value (absent or empty) fails every positive condition (``P``, ``{match: P}``,
``contains``, ``min`` / ``max``): a rule only takes what it can see. A negation only says what to
exclude, and with no value there is nothing to exclude: ``{not: P}`` alone, ``not_contains`` and
a range with ``not: true`` all pass a missing value ("value is missing: nothing to exclude").
``{match: P, not: Q}`` needs P, so a missing value fails it. To require a value, say so
positively (``slices: {min: 20}``, not ``{max: 19, not: true}``).

``body_region`` is derived (:mod:`pacs_node.routing.region`): Body Part Examined, else keywords
in the descriptions, else the volume's size; each check's reason says which evidence it read.

Every pattern is compiled when the file loads, so a bad regular expression stops the node at
start with the rule and the key, not when the first study arrives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pacs_node.outputs import ROUTE_KEYS
from pacs_node.quality.limits import QaMode, QualityLimits
from pacs_node.routing.region import BodyRegion

STRING_ATTRIBUTES = (
    "modality",
    "body_part",
    "study_description",
    "series_description",
    "sop_class",
    "calling_ae",
    "manufacturer",
)
MULTI_ATTRIBUTES = ("image_type", "body_region")
NUMBER_ATTRIBUTES = ("slices", "slice_thickness", "series_number")


NOTHING_TO_EXCLUDE = "value is missing: nothing to exclude"
NOT_DERIVED = BodyRegion((), "not derived")


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression {pattern!r}: {exc}") from exc


class TextCondition(BaseModel):
    """A full-match pattern test on one text value, optionally negated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: tuple[str, ...] = ()
    not_: tuple[str, ...] = Field(default=(), alias="not")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"match": [value]}
        if isinstance(value, list):
            return {"match": value}
        if isinstance(value, dict):
            value = dict(value)
            for key in ("match", "not"):
                if isinstance(value.get(key), str):
                    value[key] = [value[key]]
        return value

    @field_validator("match", "not_")
    @classmethod
    def _valid(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            _compile(pattern)
        return patterns

    @model_validator(mode="after")
    def _not_empty(self) -> TextCondition:
        if not self.match and not self.not_:
            raise ValueError("give a pattern, a list of patterns, or match / not")
        return self

    def test(self, value: str | None) -> tuple[bool, str]:
        if value is None or value == "":
            if self.match:
                return False, "value is missing"
            return True, NOTHING_TO_EXCLUDE
        if self.match and not any(re.fullmatch(p, value) for p in self.match):
            return False, f"{value!r} does not match {' | '.join(self.match)}"
        for pattern in self.not_:
            if re.fullmatch(pattern, value):
                return False, f"{value!r} matches excluded {pattern}"
        return True, f"{value!r} matches"


class MultiCondition(BaseModel):
    """A test on a multi-valued attribute (ImageType): one value must (not) fully match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contains: str | None = None
    not_contains: str | None = None

    @field_validator("contains", "not_contains")
    @classmethod
    def _valid(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            _compile(pattern)
        return pattern

    @model_validator(mode="after")
    def _not_empty(self) -> MultiCondition:
        if self.contains is None and self.not_contains is None:
            raise ValueError("give contains or not_contains")
        return self

    def test(self, values: Sequence[str] | None, shown: str | None = None) -> tuple[bool, str]:
        """``shown``: how the value reads in the reason (a derived value names its evidence)."""
        if not values:
            where = f" ({shown})" if shown else ""
            if self.contains is not None:
                return False, f"value is missing{where}"
            return True, f"{NOTHING_TO_EXCLUDE}{where}"
        shown = shown or "'" + "\\".join(values) + "'"
        if self.contains is not None and not any(re.fullmatch(self.contains, v) for v in values):
            return False, f"{shown} has no value matching {self.contains}"
        if self.not_contains is not None and any(
            re.fullmatch(self.not_contains, v) for v in values
        ):
            return False, f"{shown} has a value matching excluded {self.not_contains}"
        return True, f"{shown} matches"


class RangeCondition(BaseModel):
    """An inclusive numeric range; ``not: true`` inverts it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    min: float | None = None
    max: float | None = None
    not_: bool = Field(default=False, alias="not")

    @model_validator(mode="after")
    def _ordered(self) -> RangeCondition:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is larger than max")
        return self

    def test(self, value: float | None) -> tuple[bool, str]:
        if value is None:
            return (True, NOTHING_TO_EXCLUDE) if self.not_ else (False, "value is missing")
        inside = (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        bounds = f"[{'' if self.min is None else self.min}, {'' if self.max is None else self.max}]"
        if inside != self.not_:
            return True, f"{value:g} {'outside' if self.not_ else 'within'} {bounds}"
        return False, f"{value:g} {'within' if self.not_ else 'outside'} {bounds}"


class Conditions(BaseModel):
    """``when:`` of a rule; every condition given must hold for a series to match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: TextCondition | None = None
    body_part: TextCondition | None = None
    study_description: TextCondition | None = None
    series_description: TextCondition | None = None
    sop_class: TextCondition | None = None
    calling_ae: TextCondition | None = None
    manufacturer: TextCondition | None = None
    image_type: MultiCondition | None = None
    body_region: MultiCondition | None = None
    slices: RangeCondition | None = None
    slice_thickness: RangeCondition | None = None
    series_number: RangeCondition | None = None


class Selection(StrEnum):
    """Which of the matching series a rule processes."""

    THINNEST = "thinnest"  # smallest slice thickness, then most slices
    MOST_SLICES = "most_slices"
    FIRST = "first"  # lowest series number
    ALL = "all"


class OnChange(StrEnum):
    """What to do when a processed study receives new instances."""

    REPROCESS = "reprocess"
    IGNORE = "ignore"


class RouteRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    enabled: bool = True
    when: Conditions = Conditions()
    select: Selection = Selection.THINNEST
    models: tuple[str, ...] = Field(min_length=1)
    send: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    on_change: OnChange = OnChange.REPROCESS
    # The quality gate: hold (default) | flag | off, and limits that override the model's.
    qa: QaMode = QaMode.HOLD
    qa_limits: dict[str, Any] = Field(default_factory=dict)

    @field_validator("qa_limits")
    @classmethod
    def _valid_limits(cls, limits: dict[str, Any]) -> dict[str, Any]:
        # each key known here; the values are checked merged with each model's own limits at
        # start (a partial override, say only the intensity tolerance, is valid only then)
        unknown = sorted(set(limits) - set(QualityLimits.model_fields))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(QualityLimits.model_fields)}")
        return limits

    @field_validator("send")
    @classmethod
    def _known_outputs(cls, send: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        unknown = sorted(set(send) - set(ROUTE_KEYS))
        if unknown:
            raise ValueError(f"unknown output kinds {unknown}; known: {list(ROUTE_KEYS)}")
        return send


class RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[RouteRule, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> RoutesFile:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        return self


@dataclass(frozen=True)
class SeriesFacts:
    """What routing knows of one series (see :mod:`pacs_node.routing.facts`)."""

    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    sop_class: str | None = None
    calling_ae: str | None = None
    manufacturer: str | None = None
    image_type: tuple[str, ...] = ()
    body_region: BodyRegion = NOT_DERIVED
    slices: int | None = None
    slice_thickness: float | None = None
    series_number: int | None = None
    produced_by_node: bool = False


@dataclass(frozen=True)
class Check:
    attribute: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class SeriesVerdict:
    series_uid: str
    matched: bool
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    matched: bool
    reason: str
    series: tuple[SeriesVerdict, ...]
    selected: tuple[str, ...]  # series UIDs to process


def check_series(conditions: Conditions, facts: SeriesFacts) -> SeriesVerdict:
    checks: list[Check] = []
    for name in type(conditions).model_fields:
        condition = getattr(conditions, name)
        if condition is None:
            continue
        value = getattr(facts, name)
        if isinstance(value, BodyRegion):
            shown = str(value) if value.regions else value.evidence
            passed, reason = condition.test(value.regions, shown)
        else:
            passed, reason = condition.test(value)
        checks.append(Check(name, passed, reason))
    return SeriesVerdict(facts.series_uid, all(c.passed for c in checks), tuple(checks))


def _select(selection: Selection, matched: list[SeriesFacts]) -> list[SeriesFacts]:
    if not matched or selection is Selection.ALL:
        return matched
    if selection is Selection.FIRST:
        return [min(matched, key=lambda f: (f.series_number is None, f.series_number or 0))]
    if selection is Selection.MOST_SLICES:
        return [max(matched, key=lambda f: f.slices or 0)]
    return [
        min(
            matched,
            key=lambda f: (
                f.slice_thickness is None,
                f.slice_thickness or 0.0,
                -(f.slices or 0),
            ),
        )
    ]


def evaluate_rule(rule: RouteRule, series: Sequence[SeriesFacts]) -> RuleVerdict:
    if not rule.enabled:
        return RuleVerdict(rule.name, False, "rule is disabled", (), ())
    verdicts: list[SeriesVerdict] = []
    candidates: list[SeriesFacts] = []
    for facts in series:
        if facts.produced_by_node:
            check = Check("origin", False, "produced by this node; never routed")
            verdicts.append(SeriesVerdict(facts.series_uid, False, (check,)))
            continue
        verdict = check_series(rule.when, facts)
        verdicts.append(verdict)
        if verdict.matched:
            candidates.append(facts)
    chosen = _select(rule.select, candidates)
    if not chosen:
        return RuleVerdict(rule.name, False, "no series matched", tuple(verdicts), ())
    reason = f"{len(candidates)} series matched; selected by {rule.select.value}"
    return RuleVerdict(
        rule.name, True, reason, tuple(verdicts), tuple(f.series_uid for f in chosen)
    )


def route(routes: RoutesFile, series: Sequence[SeriesFacts]) -> list[RuleVerdict]:
    """Every rule's verdict for a study; the study is unrouted when none matched."""
    return [evaluate_rule(rule, series) for rule in routes.rules]
