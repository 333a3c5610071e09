"""Build every result object of one (Volume, Labelmap, ModelInfo) once, as stored bytes.

In two parts, so that a caller can send the first while it builds the second:
:func:`build_primary` (measurements, the quality gate, SEG and SR) and :func:`build_extras`
(presentation state, key images, PDF, FHIR); :func:`build_results` is both.

The worker stores a :class:`ResultSet`'s bytes and dispatch sends those bytes, never a rebuild:
highdicom stamps creation times, so a rebuild is never byte-identical, while the UIDs are (see
:mod:`.provenance`), so a PACS de-duplicates a retry.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pydicom import Dataset

from pacs_node.errors import ResultsError
from pacs_node.imaging.volume import Volume
from pacs_node.inference.labelmap import Labelmap, ModelInfo
from pacs_node.outputs import OutputKind
from pacs_node.quality.checks import Verdict, run_checks
from pacs_node.results.fhir import build_bundle, bundle_json, patient_search
from pacs_node.results.measurements import Finding, measure_labelmap
from pacs_node.results.options import ResultOptions
from pacs_node.results.overlay import (
    build_key_images,
    build_presentation_state,
    key_slices,
    render_slice,
)
from pacs_node.results.pdf import build_pdf, encapsulate_pdf
from pacs_node.results.provenance import Provenance
from pacs_node.results.seg import SegmentNumbering, build_segmentation, segment_numbering
from pacs_node.results.sr import build_measurement_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    """One DICOM instance as the bytes to store and send (Part 10 file, Explicit VR LE unless
    named otherwise by ``transfer_syntax_uid``)."""

    kind: OutputKind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    data: bytes


@dataclass(frozen=True)
class ResultSet:
    """Every result of one segmentation; ``dicom`` lists what goes to the PACS (the JPEG 2000
    SEG copy, when built, is in ``alternates`` for a dispatcher that prefers it)."""

    study_instance_uid: str
    findings: tuple[Finding, ...]
    dicom: tuple[StoredObject, ...]
    alternates: tuple[StoredObject, ...] = ()
    pdf: bytes = b""
    fhir_bundle: bytes = b""
    patient_search: str = ""
    # One Bundle per FHIR destination, under that EHR's patient identifier rules
    # (ResultOptions.fhir_destinations): name -> (Bundle bytes, patient search).
    fhir_by_destination: Mapping[str, tuple[bytes, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)
    verdict: Verdict | None = None  # the quality gate's, None when it did not run

    def of_kind(self, kind: OutputKind) -> tuple[StoredObject, ...]:
        return tuple(o for o in (*self.dicom, *self.alternates) if o.kind is kind)


def stored(kind: OutputKind, ds: Dataset) -> StoredObject:
    """A dataset as Part 10 bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return StoredObject(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        data=buffer.getvalue(),
    )


@dataclass(frozen=True)
class PrimaryResults:
    """What :func:`build_primary` made: the SEG and the TID 1500 SR (``results``, what the PACS
    needs first), and what :func:`build_extras` goes on from, so that the measurements, the
    gate's verdict and the UIDs are made once and are the same in both parts."""

    results: ResultSet  # SEG (and its JPEG 2000 copy) and SR; no PDF, no FHIR
    provenance: Provenance
    numbering: SegmentNumbering
    flagged: Verdict | None  # the failed verdict to name in the reports, when flagging
    sr_uid: str | None  # None when nothing was found (no SEG, no SR)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.results.findings


def build_primary(
    volume: Volume,
    labelmap: Labelmap,
    model_info: ModelInfo,
    options: ResultOptions | None = None,
) -> PrimaryResults:
    """The measurements, the quality gate's verdict, the SEG and the TID 1500 SR: the results a
    radiologist opens first, built before the rest so that they can be sent at once (see
    :func:`build_extras` for the rest)."""
    options = options or ResultOptions()
    if not volume.headers:
        raise ResultsError("the volume has no source headers to reference")
    provenance = Provenance.of(volume, labelmap, model_info, options)
    findings = measure_labelmap(volume, labelmap)
    verdict = (
        run_checks(volume, findings, options.quality, labelmap)
        if options.quality is not None
        else None
    )
    flagged = (
        verdict if verdict is not None and options.quality_flag and not verdict.passed else None
    )
    numbering = segment_numbering(labelmap)
    objects: list[StoredObject] = []
    alternates: list[StoredObject] = []
    notes: list[str] = []
    sr_uid = None
    if numbering.by_value:
        seg = build_segmentation(volume, labelmap, provenance, numbering=numbering)
        objects.append(stored(OutputKind.SEG, seg))
        if options.jpeg2000_copy:
            compressed = build_segmentation(
                volume, labelmap, provenance, numbering=numbering, jpeg2000=True
            )
            alternates.append(stored(OutputKind.SEG_JPEG2000, compressed))
        sr = build_measurement_report(findings, seg, numbering, provenance, flagged=flagged)
        objects.append(stored(OutputKind.SR, sr))
        sr_uid = str(sr.SOPInstanceUID)
    else:
        notes.append("no segment found: no SEG, SR, presentation state or key images")
    results = ResultSet(
        study_instance_uid=provenance.study_uid,
        findings=findings,
        dicom=tuple(objects),
        alternates=tuple(alternates),
        notes=tuple(notes),
        verdict=verdict,
    )
    return PrimaryResults(results, provenance, numbering, flagged, sr_uid)


def build_extras(volume: Volume, labelmap: Labelmap, primary: PrimaryResults) -> ResultSet:
    """The presentation state, the key images, the PDF (file and DICOM) and the FHIR Bundles
    of what :func:`build_primary` found, as a :class:`ResultSet` of these only (the FHIR
    report carries every measurement and references the SR)."""
    provenance, findings, flagged = primary.provenance, primary.findings, primary.flagged
    options = provenance.options
    objects: list[StoredObject] = []
    if primary.numbering.by_value:
        gsps = build_presentation_state(
            volume, labelmap, findings, primary.numbering.by_value, provenance
        )
        objects.append(stored(OutputKind.GSPS, gsps))
        for image in build_key_images(volume, labelmap, findings, provenance):
            objects.append(stored(OutputKind.KEY_IMAGES, image))
    slices = key_slices(labelmap, findings, options.key_images or 4, every=False)
    pictures = [render_slice(volume, labelmap, z, findings, provenance) for z in slices]
    pdf = build_pdf(findings, pictures, provenance, flagged=flagged)
    objects.append(stored(OutputKind.PDF, encapsulate_pdf(pdf, provenance)))
    sr_uid = primary.sr_uid
    bundle = build_bundle(findings, pdf, provenance, sr_uid=sr_uid, flagged=flagged)
    by_destination: dict[str, tuple[bytes, str]] = {}
    for name, rules in options.fhir_destinations.items():
        theirs = replace(provenance, options=replace(options, fhir=rules))
        by_destination[name] = (
            bundle_json(build_bundle(findings, pdf, theirs, sr_uid=sr_uid, flagged=flagged)),
            patient_search(theirs),
        )
    return ResultSet(
        study_instance_uid=provenance.study_uid,
        findings=findings,
        dicom=tuple(objects),
        pdf=pdf,
        fhir_bundle=bundle_json(bundle),
        patient_search=patient_search(provenance),
        fhir_by_destination=by_destination,
        verdict=primary.results.verdict,
    )


def combine(first: ResultSet, then: ResultSet) -> ResultSet:
    """The primary results and the extras as one set (the SEG and SR first), as
    :func:`build_results` returns it."""
    return ResultSet(
        study_instance_uid=first.study_instance_uid,
        findings=first.findings,
        dicom=(*first.dicom, *then.dicom),
        alternates=(*first.alternates, *then.alternates),
        pdf=then.pdf or first.pdf,
        fhir_bundle=then.fhir_bundle or first.fhir_bundle,
        patient_search=then.patient_search or first.patient_search,
        fhir_by_destination={**first.fhir_by_destination, **then.fhir_by_destination},
        notes=(*first.notes, *then.notes),
        verdict=first.verdict,
    )


def build_results(
    volume: Volume,
    labelmap: Labelmap,
    model_info: ModelInfo,
    options: ResultOptions | None = None,
) -> ResultSet:
    """SEG, SR, GSPS, key images, PDF (file and DICOM) and the FHIR Bundle, as stored bytes:
    :func:`build_primary` then :func:`build_extras`, combined.

    With nothing found there is no SEG to reference, so no SR, GSPS or key image either
    (highdicom's TID 1500 needs at least one measurement group): the PDF and the FHIR report
    still say so, and ``notes`` records it. With ``options.quality`` the gate's checks run on
    the findings (``verdict``); with ``options.quality_flag`` a failed check is also named in
    the SR, the PDF and the FHIR report.
    """
    primary = build_primary(volume, labelmap, model_info, options)
    built = combine(primary.results, build_extras(volume, labelmap, primary))
    log.info(
        "results built",
        extra={
            "study_uid": built.study_instance_uid,
            "objects": len(built.dicom),
            "segments": len(primary.numbering.by_value),
        },
    )
    return built
