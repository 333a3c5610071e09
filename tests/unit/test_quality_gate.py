"""The quality gate's checks, limits and how a failed check shows in the SR, PDF and FHIR."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import zlib
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import dcmread

from pacs_node.errors import BundleError
from pacs_node.imaging import load_series
from pacs_node.inference.labelmap import Labelmap, SegmentSpec
from pacs_node.inference.registry import load_bundle
from pacs_node.inference.vocabulary import structure
from pacs_node.quality.checks import Verdict, cut_by_volume, run_checks
from pacs_node.quality.limits import QualityLimits, merge_limits
from pacs_node.results import OutputKind, ResultOptions, build_results, measure_labelmap
from pacs_node.routing.rules import RouteRule
from tests.results_factory import AXIAL, box, make_series, radiograph_study, torso_study

MODELS = Path(__file__).resolve().parents[2] / "models"


def _ids(verdict: Verdict) -> list[tuple[str, str]]:
    return [(f.check, f.label) for f in verdict.failures]


def test_no_limits_passes_a_plausible_torso() -> None:
    volume, labelmap, _ = torso_study()
    findings = measure_labelmap(volume, labelmap)
    verdict = run_checks(volume, findings, QualityLimits(), labelmap)
    assert verdict.passed
    assert verdict.as_json() == {"verdict": "pass", "failures": []}


def test_a_side_on_the_wrong_side_always_fails() -> None:
    volume, labelmap, _ = torso_study(kidney_on_wrong_side=True)
    findings = measure_labelmap(volume, labelmap)
    verdict = run_checks(volume, findings, QualityLimits(), labelmap)
    assert _ids(verdict) == [("side_conflict", "kidney_left")]
    failure = verdict.failures[0]
    assert failure.value == "right"
    assert "left/right swap" in failure.message


def test_size_outside_the_normal_range() -> None:
    volume, labelmap, _ = torso_study()
    findings = measure_labelmap(volume, _inner(labelmap, "lung_left"))
    lung = next(f for f in findings if f.segment.name == "lung_left")
    assert lung.volume_ml is not None
    inside = QualityLimits.model_validate(
        {"sizes": {"lung_left": [lung.volume_ml - 1, lung.volume_ml + 1]}}
    )
    assert run_checks(volume, findings, inside).passed
    small = QualityLimits.model_validate({"sizes": {"lung_left": {"min": lung.volume_ml + 5}}})
    verdict = run_checks(volume, findings, small)
    assert _ids(verdict) == [("size_range", "lung_left")]
    assert verdict.failures[0].value == f"{lung.volume_ml:.1f} mL"
    assert "smaller than the normal range" in verdict.failures[0].message
    large = QualityLimits.model_validate({"sizes": {"lung_left": [0, lung.volume_ml / 2]}})
    assert "larger" in run_checks(volume, findings, large).failures[0].message


def test_a_part_cut_by_the_series_end_is_never_too_small() -> None:
    """A short series holds part of an organ: the floor of its range does not apply to a label
    the first or last slice cuts; the ceiling does."""
    volume, labelmap, _ = torso_study()
    findings = measure_labelmap(volume, labelmap)
    part = next(
        f for f in findings if f.present and f.segment.name != "body" and cut_by_volume(volume, f)
    )
    assert part.volume_ml is not None
    name = part.segment.name
    floor = QualityLimits.model_validate({"sizes": {name: {"min": part.volume_ml * 10}}})
    assert run_checks(volume, findings, floor).passed
    ceiling = QualityLimits.model_validate({"sizes": {name: [0, part.volume_ml / 2]}})
    assert _ids(run_checks(volume, findings, ceiling)) == [("size_range", name)]
    whole = measure_labelmap(volume, _inner(labelmap, name))
    assert _ids(run_checks(volume, whole, floor)) == [("size_range", name)]


CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rows run from head to feet, slices front to back
LIVER = (SegmentSpec(1, structure("liver")),)


def _liver_floor(orientation: tuple[float, ...], start: tuple[int, int, int]) -> list[str]:
    """The size_range failures of a 6 x 8 x 8 voxel "liver" at array index ``start`` of a
    12 x 24 x 24 series, held to a floor far above its size."""
    shape = (12, 24, 24)
    liver = box(shape, start, (6, 8, 8))
    stored = np.where(liver, 60, -50).astype(np.int16)
    volume = load_series(make_series(stored, spacing=(3.0, 2.0, 2.0), orientation=orientation))
    labelmap = Labelmap(liver.astype(np.uint8), LIVER)
    (finding,) = measure_labelmap(volume, labelmap)
    assert finding.volume_ml is not None
    floor = QualityLimits.model_validate({"sizes": {"liver": {"min": finding.volume_ml * 10}}})
    cut = cut_by_volume(volume, finding)
    labels = [label for _, label in _ids(run_checks(volume, [finding], floor))]
    assert cut == (not labels)  # a part is exempt from the floor, a whole organ is not
    return labels


@pytest.mark.parametrize(
    ("orientation", "start", "held"),
    [
        (AXIAL, (3, 8, 8), True),  # inside the volume: whole, too small
        (AXIAL, (0, 8, 8), False),  # cut by the series' first slice
        (AXIAL, (6, 8, 8), False),  # cut by its last slice
        (CORONAL, (3, 0, 8), False),  # coronal: cut by the field's top edge (head end)
        (CORONAL, (3, 16, 8), False),  # ... and by its bottom edge (feet end)
        (CORONAL, (3, 8, 8), True),  # coronal, inside: whole
        (AXIAL, (3, 8, 16), False),  # axial, cut by the field's edge at the last column
        (AXIAL, (3, 0, 8), False),  # ... and at the first row
    ],
)
def test_a_part_cut_by_any_face_of_the_volume_is_never_too_small(
    orientation: tuple[float, ...], start: tuple[int, int, int], held: bool
) -> None:
    """Whatever the series' orientation, the volume's six faces (its first and last slice, row
    and column) cut what reaches them: the floor of the range does not apply."""
    assert _liver_floor(orientation, start) == (["liver"] if held else [])


def test_an_unmeasurable_size_is_not_a_failure() -> None:
    volume, labelmap, _ = radiograph_study()
    findings = measure_labelmap(volume, labelmap)
    measured = [f.area_cm2 for f in findings]
    assert all(a is not None for a in measured)
    tiny = QualityLimits.model_validate({"sizes": {"lung_left": [0, 0.1], "lung_right": [0, 0.1]}})
    assert {c for c, _ in _ids(run_checks(volume, findings, tiny))} == {"size_range"}
    gone = [replace(f, area_cm2=None, not_measurable=("area",)) for f in findings]
    assert run_checks(volume, gone, tiny).passed


def _inner(labelmap: Labelmap, *names: str) -> Labelmap:
    """``names`` trimmed off the series' first and last slice (body there instead), so the
    series cuts none of them."""
    labels = labelmap.labels.copy()
    for spec in labelmap.segments:
        if spec.name in names:
            for z in (0, labels.shape[0] - 1):
                labels[z][labels[z] == spec.value] = 1
    return Labelmap(labels, labelmap.segments)


def test_pair_balance() -> None:
    volume, labelmap, _ = torso_study()
    labelmap = _inner(labelmap, "kidney_left", "kidney_right")
    labels = labelmap.labels.copy()
    right = next(s.value for s in labelmap.segments if s.name == "kidney_right")
    rows = np.argwhere(labels == right)
    keep = rows[: len(rows) // 4]  # three quarters of the right kidney gone
    labels[labels == right] = 1
    labels[tuple(keep.T)] = right
    thin = Labelmap(labels, labelmap.segments)
    findings = measure_labelmap(volume, thin)
    limits = QualityLimits(pair_ratio_max=2.0)
    verdict = run_checks(volume, findings, limits)
    assert _ids(verdict) == [("pair_balance", "kidney")]
    assert float(verdict.failures[0].value) > 3.5
    assert run_checks(volume, measure_labelmap(volume, labelmap), limits).passed
    # the same pair cut by the series' first slice is a part of each kidney: not compared
    labels[0, 28:30, 16:18] = right  # where the right kidney's box starts
    cut = measure_labelmap(volume, Labelmap(labels, labelmap.segments))
    assert run_checks(volume, cut, limits).passed


def test_position_side_and_order() -> None:
    volume, labelmap, _ = torso_study()
    findings = measure_labelmap(volume, _inner(labelmap, "lung_left", "kidney_left"))
    good = QualityLimits.model_validate(
        {"sides": {"spine": "left"}, "order": [{"upper": "lung_left", "lower": "kidney_left"}]}
    )
    # the spine lies within the midline band: not on the other side, so it passes
    assert next(f for f in findings if f.segment.name == "spine").centroid_side == "midline"
    assert run_checks(volume, findings, good).passed
    wrong = QualityLimits.model_validate(
        {"sides": {"lung_left": "right"}, "order": [{"upper": "kidney_left", "lower": "lung_left"}]}
    )
    verdict = run_checks(volume, findings, wrong)
    assert _ids(verdict) == [("position_side", "lung_left"), ("position_order", "kidney_left")]
    assert verdict.failures[0].value == "left"
    # organs cut by the series' ends: their centres are of parts, so no order is judged
    cut = measure_labelmap(volume, labelmap)
    assert _ids(run_checks(volume, cut, wrong)) == [("position_side", "lung_left")]
    assert "below" in verdict.failures[1].message


def test_fragmented_and_coverage() -> None:
    volume, labelmap, _ = torso_study(body_island=True)
    findings = measure_labelmap(volume, labelmap)
    body = next(f for f in findings if f.segment.name == "body")
    assert body.components == 2
    verdict = run_checks(volume, findings, QualityLimits(max_components={"body": 1}))
    assert _ids(verdict) == [("fragmented", "body")]
    assert run_checks(volume, findings, QualityLimits(max_components={"body": 2})).passed
    # the heart spans slices 5..8 of 10: inner, so too few slices for min_slices 5 ...
    heart = next(f for f in findings if f.segment.name == "heart")
    assert heart.slice_range == (5, 8)
    few = run_checks(volume, findings, QualityLimits(min_slices=5))
    assert ("coverage_slices", "heart") not in _ids(few)  # ... but 10 slices < 4 x 5
    labels = labelmap.labels.copy()
    heart_value = heart.segment.value
    labels[labels == heart_value] = 1
    labels[4, 14:23, 30:39] = heart_value  # one inner slice
    one = Labelmap(labels, labelmap.segments)
    verdict = run_checks(volume, measure_labelmap(volume, one), QualityLimits(min_slices=2))
    assert _ids(verdict) == [("coverage_slices", "heart")]
    assert verdict.failures[0].value == "1 of 10 slices"
    # a label at the series' end may be cut by it: kidneys in slices 0..3 pass
    assert run_checks(volume, findings, QualityLimits(min_slices=2)).passed
    fraction = QualityLimits(max_image_fraction=0.05)
    assert ("coverage_image", "lung_left") not in _ids(run_checks(volume, findings, fraction))
    everywhere = labelmap.labels.copy()
    lung = next(s.value for s in labelmap.segments if s.name == "lung_left")
    everywhere[everywhere == 0] = lung
    flood = measure_labelmap(volume, Labelmap(everywhere, labelmap.segments))
    verdict = run_checks(volume, flood, QualityLimits(max_image_fraction=0.3))
    assert _ids(verdict) == [("coverage_image", "lung_left")]


def test_input_intensity_against_the_reference() -> None:
    volume, labelmap, _ = torso_study()
    findings = measure_labelmap(volume, labelmap)
    near = {"percentiles": [50], "reference": [40], "tolerance": 30}
    assert run_checks(volume, findings, QualityLimits(intensity=near), labelmap).passed
    far = {"percentiles": [50], "reference": [400], "tolerance": 30}
    verdict = run_checks(volume, findings, QualityLimits(intensity=far), labelmap)
    assert _ids(verdict) == [("input_intensity", "")]
    assert "trained on" in verdict.failures[0].message


def test_limits_validate_and_merge() -> None:
    with pytest.raises(ValidationError):
        QualityLimits.model_validate({"sizes": {"liver": [3000, 100]}})
    with pytest.raises(ValidationError):
        QualityLimits.model_validate({"unknown": 1})
    with pytest.raises(ValidationError):
        QualityLimits.model_validate({"pair_ratio_max": 0.5})
    base = QualityLimits.model_validate({"sizes": {"liver": [500, 3000], "spleen": [50, 600]}})
    merged = merge_limits(base, {"sizes": {"liver": [10, 20]}, "pair_ratio_max": 2})
    assert merged.sizes["liver"].max == 20
    assert merged.sizes["spleen"].max == 600
    assert merged.pair_ratio_max == 2
    assert merge_limits(base, None) is base


def test_a_route_validates_its_qa_settings() -> None:
    rule = RouteRule.model_validate({"name": "r", "models": ["m"]})
    assert rule.qa == "hold"
    assert RouteRule.model_validate({"name": "r", "models": ["m"], "qa": "flag"}).qa == "flag"
    with pytest.raises(ValidationError, match="qa"):
        RouteRule.model_validate({"name": "r", "models": ["m"], "qa": "maybe"})
    with pytest.raises(ValidationError, match="unknown keys"):
        RouteRule.model_validate({"name": "r", "models": ["m"], "qa_limits": {"size": {}}})


def test_a_bundle_refuses_limits_for_labels_it_lacks(tmp_path: Path) -> None:
    root = tmp_path / "ct-classical"
    shutil.copytree(MODELS / "ct-classical", root)
    meta = root / "configs" / "metadata.json"
    data = json.loads(meta.read_text())
    data.setdefault("pacs_node", {})["quality"] = {"sizes": {"liver": [1, 2]}}
    meta.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="liver"):
        load_bundle(root)
    data["pacs_node"]["quality"] = {"sizes": {"bone": [1, 2]}, "pair_ratio_max": 2.5}
    meta.write_text(json.dumps(data))
    assert load_bundle(root).quality.pair_ratio_max == 2.5


def _pdf_streams(pdf: bytes) -> bytes:
    """The page content streams (reportlab: ASCII85 then Flate), decoded."""
    out = b""
    for match in re.finditer(rb"\bstream\r?\n(.*?)endstream", pdf, re.S):
        data = match.group(1).strip()
        try:
            if data.endswith(b"~>"):
                data = base64.a85decode(data[:-2])
            out += zlib.decompress(data)
        except (ValueError, zlib.error):
            continue
    return out


def test_flagged_results_name_the_failed_checks() -> None:
    volume, labelmap, info = torso_study(kidney_on_wrong_side=True)
    plain = build_results(volume, labelmap, info, ResultOptions(quality=QualityLimits()))
    assert plain.verdict is not None
    assert not plain.verdict.passed
    flagged = build_results(
        volume, labelmap, info, ResultOptions(quality=QualityLimits(), quality_flag=True)
    )
    assert flagged.verdict == plain.verdict
    (sr_object,) = flagged.of_kind(OutputKind.SR)
    sr = dcmread(io.BytesIO(sr_object.data))
    texts = [
        item.TextValue
        for container in sr.ContentSequence
        if container.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        for item in container.ContentSequence
    ]
    assert len(texts) == 1
    assert "side_conflict" in texts[0]
    assert "swap" in texts[0]
    read = hd.sr.srread(io.BytesIO(sr_object.data))  # still a TID 1500 report highdicom reads
    found = sum(f.present for f in flagged.findings)
    assert len(read.content.get_volumetric_roi_measurement_groups()) == found
    (plain_sr,) = plain.of_kind(OutputKind.SR)
    assert b"C0034375" not in plain_sr.data
    bundle = json.loads(flagged.fhir_bundle)
    resources = [e["resource"] for e in bundle["entry"]]
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    assert "Quality check failed" in report["conclusion"]
    noted = [
        r for r in resources
        if r["resourceType"] == "Observation"
        and any("Quality check failed" in n["text"] for n in r.get("note", []))
    ]  # fmt: skip
    assert noted
    assert all("kidney" in r["bodySite"]["text"].lower() for r in noted)
    plain_report = next(
        e["resource"]
        for e in json.loads(plain.fhir_bundle)["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert "Quality check failed" not in plain_report["conclusion"]
    red_box = b".992157 .909804 .909804 rg"  # the box's fill (#fde8e8)
    assert red_box in _pdf_streams(flagged.pdf)
    assert red_box not in _pdf_streams(plain.pdf)


def test_no_gate_without_limits() -> None:
    volume, labelmap, info = torso_study(kidney_on_wrong_side=True)
    assert build_results(volume, labelmap, info).verdict is None
