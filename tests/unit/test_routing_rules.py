"""The routing grammar, table-driven: full-match semantics, negation (and what it does with a
missing value), ranges, selection, and the derived body region in a check's reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pacs_node.routing.region import BodyRegion
from pacs_node.routing.rules import (
    NOTHING_TO_EXCLUDE,
    Conditions,
    MultiCondition,
    RangeCondition,
    RoutesFile,
    Selection,
    SeriesFacts,
    TextCondition,
    check_series,
    evaluate_rule,
    route,
)

MISSING = "value is missing"


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ("CT", "CT", True),
        ("CT", "CTA LOCALIZER", False),  # full match, never a substring
        ("CT", "ct", False),
        ("(?i)ct", "CT", True),
        (["CR", "DX"], "DX", True),
        (["CR", "DX"], "MR", False),
        ({"not": "(?i).*localizer.*"}, "Axial 1mm", True),
        ({"not": "(?i).*localizer.*"}, "LOCALIZER", False),
        ({"match": "CHEST|ABDOMEN", "not": "ABDOMEN"}, "CHEST", True),
        ({"match": "CHEST|ABDOMEN", "not": "ABDOMEN"}, "ABDOMEN", False),
    ],
)
def test_text_condition(spec: Any, value: str | None, expected: bool) -> None:
    passed, reason = TextCondition.model_validate(spec).test(value)
    assert passed is expected
    assert reason


# A missing value (absent or empty) fails what a condition requires and passes what it excludes.
@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize(
    ("spec", "expected", "reason"),
    [
        ("CT", False, MISSING),
        ({"match": "CT"}, False, MISSING),
        (["CR", "DX"], False, MISSING),
        ({"not": "(?i).*scout.*"}, True, NOTHING_TO_EXCLUDE),
        ({"not": ["A", "B"]}, True, NOTHING_TO_EXCLUDE),
        ({"match": "CHEST", "not": "ABDOMEN"}, False, MISSING),  # needs CHEST
    ],
)
def test_text_condition_on_a_missing_value(
    spec: Any, value: str | None, expected: bool, reason: str
) -> None:
    assert TextCondition.model_validate(spec).test(value) == (expected, reason)


@pytest.mark.parametrize(
    ("spec", "values", "expected"),
    [
        ({"contains": "AXIAL"}, ("ORIGINAL", "PRIMARY", "AXIAL"), True),
        ({"contains": "AXIAL"}, ("ORIGINAL", "PRIMARY", "AXIAL_2"), False),
        ({"not_contains": "LOCALIZER"}, ("ORIGINAL", "PRIMARY", "LOCALIZER"), False),
        ({"not_contains": "LOCALIZER"}, ("ORIGINAL", "PRIMARY", "AXIAL"), True),
        ({"contains": "AXIAL", "not_contains": "LOCALIZER"}, ("AXIAL", "LOCALIZER"), False),
    ],
)
def test_multi_condition(spec: Any, values: tuple[str, ...], expected: bool) -> None:
    assert MultiCondition.model_validate(spec).test(values)[0] is expected


@pytest.mark.parametrize(
    ("spec", "expected", "reason"),
    [
        ({"contains": "AXIAL"}, False, MISSING),
        ({"not_contains": "LOCALIZER"}, True, NOTHING_TO_EXCLUDE),
        ({"contains": "AXIAL", "not_contains": "LOCALIZER"}, False, MISSING),  # needs AXIAL
    ],
)
def test_multi_condition_on_a_missing_value(spec: Any, expected: bool, reason: str) -> None:
    assert MultiCondition.model_validate(spec).test(()) == (expected, reason)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ({"min": 20}, 20, True),
        ({"min": 20}, 19, False),
        ({"max": 5.0}, 5.0, True),
        ({"max": 5.0}, 5.01, False),
        ({"min": 1, "max": 3}, 2, True),
        ({"min": 1, "max": 3, "not": True}, 2, False),
        ({"min": 1, "max": 3, "not": True}, 4, True),
    ],
)
def test_range_condition(spec: Any, value: float | None, expected: bool) -> None:
    assert RangeCondition.model_validate(spec).test(value)[0] is expected


@pytest.mark.parametrize(
    ("spec", "expected", "reason"),
    [
        ({"min": 1}, False, MISSING),
        ({"min": 1, "max": 3}, False, MISSING),
        ({"max": 5.0, "not": True}, True, NOTHING_TO_EXCLUDE),  # excludes <= 5: nothing here
        ({"min": 1, "max": 3, "not": True}, True, NOTHING_TO_EXCLUDE),
    ],
)
def test_range_condition_on_a_missing_value(spec: Any, expected: bool, reason: str) -> None:
    assert RangeCondition.model_validate(spec).test(None) == (expected, reason)


def test_a_body_region_check_names_its_evidence() -> None:
    conditions = Conditions.model_validate({"body_region": {"contains": "CHEST|TORSO"}})
    head = BodyRegion(("HEAD",), "Body Part Examined 'HEAD'")
    (check,) = check_series(conditions, SeriesFacts("1", body_region=head)).checks
    assert not check.passed
    assert check.reason == "HEAD (Body Part Examined 'HEAD') has no value matching CHEST|TORSO"
    unknown = BodyRegion((), "no body part or description; no usable geometry")
    (check,) = check_series(conditions, SeriesFacts("1", body_region=unknown)).checks
    assert (check.passed, check.reason) == (
        False,
        "value is missing (no body part or description; no usable geometry)",
    )
    excluding = Conditions.model_validate({"body_region": {"not_contains": "HEAD"}})
    (check,) = check_series(excluding, SeriesFacts("1", body_region=unknown)).checks
    assert check.passed
    assert check.reason.startswith(NOTHING_TO_EXCLUDE)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "a", "models": ["m"], "when": {"modality": "(CT"}}, "regular expression"),
        ({"name": "a", "models": []}, "at least 1"),
        ({"name": "a", "models": ["m"], "when": {"slices": {"min": 5, "max": 1}}}, "larger"),
        ({"name": "a", "models": ["m"], "when": {"slices": {}}}, "min, max"),
        ({"name": "a", "models": ["m"], "when": {"colour": "red"}}, "Extra inputs"),
        ({"name": "a", "models": ["m"], "send": {"video": ["PACS"]}}, "unknown output"),
        ({"name": "a b", "models": ["m"]}, "pattern"),
    ],
)
def test_bad_rules_fail_at_load(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RoutesFile.model_validate({"rules": [rule]})


STUDY = [
    SeriesFacts(
        "1.1",
        modality="CT",
        series_description="Topogram",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        slices=2,
        slice_thickness=None,
        series_number=1,
    ),
    SeriesFacts(
        "1.2",
        modality="CT",
        series_description="Axial 5mm",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slices=60,
        slice_thickness=5.0,
        series_number=2,
    ),
    SeriesFacts(
        "1.3",
        modality="CT",
        series_description="Axial 1mm",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slices=300,
        slice_thickness=1.0,
        series_number=3,
    ),
]

ROUTES = RoutesFile.model_validate(
    {
        "rules": [
            {
                "name": "ct-torso",
                "when": {
                    "modality": "CT",
                    "image_type": {"not_contains": "LOCALIZER"},
                    "slices": {"min": 20},
                },
                "select": "thinnest",
                "models": ["ct-torso-organs"],
            },
            {"name": "chest-xr", "when": {"modality": ["CR", "DX"]}, "models": ["xr-chest-lungs"]},
        ]
    }
)


def test_thin_axial_series_is_selected_over_thick_and_localizer() -> None:
    ct, xr = route(ROUTES, STUDY)
    assert ct.matched
    assert ct.selected == ("1.3",)
    localizer = next(v for v in ct.series if v.series_uid == "1.1")
    assert not localizer.matched
    assert {c.attribute for c in localizer.checks if not c.passed} == {"image_type", "slices"}
    assert not xr.matched
    assert xr.reason == "no series matched"


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ("thinnest", ("1.3",)),
        ("most_slices", ("1.3",)),
        ("first", ("1.2",)),
        ("all", ("1.2", "1.3")),
    ],
)
def test_selection(select: str, expected: tuple[str, ...]) -> None:
    rule = ROUTES.rules[0].model_copy(update={"select": Selection(select)})
    assert evaluate_rule(rule, STUDY).selected == expected


def test_objects_the_node_produced_are_never_routed() -> None:
    ours = SeriesFacts("9.9", modality="CT", slices=100, slice_thickness=1.0, produced_by_node=True)
    verdict = evaluate_rule(ROUTES.rules[0], [ours])
    assert not verdict.matched
    assert "produced by this node" in verdict.series[0].checks[0].reason


def test_disabled_rule() -> None:
    rule = ROUTES.rules[0].model_copy(update={"enabled": False})
    assert not evaluate_rule(rule, STUDY).matched
