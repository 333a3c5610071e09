"""The results in two parts: :func:`build_primary` (measurements, gate, SEG, SR) and
:func:`build_extras` (presentation state, key images, PDF, FHIR) make what
:func:`build_results` makes, with the same UIDs, and the FHIR report still carries every
measurement."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pacs_node.results import (
    OutputKind,
    ResultOptions,
    build_extras,
    build_primary,
    build_results,
    combine,
)
from tests.results_factory import phantom_study

FIXED = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)


def _uids(objects: tuple[object, ...]) -> list[tuple[str, str]]:
    return [(str(o.kind), o.sop_instance_uid) for o in objects]  # type: ignore[attr-defined]


def test_primary_then_extras_is_build_results() -> None:
    volume, labelmap, info = phantom_study()
    options = ResultOptions(jpeg2000_copy=True, created=FIXED)

    primary = build_primary(volume, labelmap, info, options)
    assert [o.kind for o in primary.results.dicom] == [OutputKind.SEG, OutputKind.SR]
    assert [o.kind for o in primary.results.alternates] == [OutputKind.SEG_JPEG2000]
    assert primary.results.pdf == b""
    assert primary.results.fhir_bundle == b""
    assert primary.sr_uid == primary.results.dicom[1].sop_instance_uid

    extras = build_extras(volume, labelmap, primary)
    kinds = {o.kind for o in extras.dicom}
    assert kinds == {OutputKind.GSPS, OutputKind.KEY_IMAGES, OutputKind.PDF}
    assert extras.pdf.startswith(b"%PDF")

    whole = build_results(volume, labelmap, info, options)
    parts = combine(primary.results, extras)
    assert _uids(parts.dicom) == _uids(whole.dicom)  # same objects, same order, same UIDs
    assert _uids(parts.alternates) == _uids(whole.alternates)
    assert parts.findings == whole.findings

    bundle = json.loads(extras.fhir_bundle)
    observations = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    assert len(observations) >= len(primary.findings)  # every measurement, in the report
    assert primary.sr_uid is not None
    assert primary.sr_uid in extras.fhir_bundle.decode()  # the report references the SR


def test_with_nothing_found_the_primary_part_is_empty_and_the_extras_say_so() -> None:
    volume, labelmap, info = phantom_study()
    labelmap.labels[:] = 0
    primary = build_primary(volume, labelmap, info, ResultOptions(created=FIXED))
    assert primary.results.dicom == ()
    assert primary.sr_uid is None
    assert primary.results.notes
    extras = build_extras(volume, labelmap, primary)
    assert [o.kind for o in extras.dicom] == [OutputKind.PDF]
    assert extras.fhir_bundle
