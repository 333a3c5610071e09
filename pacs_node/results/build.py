"""Build every result object of one (Volume, Labelmap, ModelInfo) once, as stored bytes.

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
from pacs_node.results.seg import build_segmentation, segment_numbering
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


def build_results(
    volume: Volume,
    labelmap: Labelmap,
    model_info: ModelInfo,
    options: ResultOptions | None = None,
) -> ResultSet:
    """SEG, SR, GSPS, key images, PDF (file and DICOM) and the FHIR Bundle, as stored bytes.

    With nothing found there is no SEG to reference, so no SR, GSPS or key image either
    (highdicom's TID 1500 needs at least one measurement group): the PDF and the FHIR report
    still say so, and ``notes`` records it. With ``options.quality`` the gate's checks run on
    the findings (``verdict``); with ``options.quality_flag`` a failed check is also named in
    the SR, the PDF and the FHIR report.
    """
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
    if numbering.by_value:
        seg = build_segmentation(volume, labelmap, provenance, numbering=numbering)
        objects.append(stored(OutputKind.SEG, seg))
        if options.jpeg2000_copy:
            compressed = build_segmentation(
                volume, labelmap, provenance, numbering=numbering, jpeg2000=True
            )
            alternates.append(stored(OutputKind.SEG_JPEG2000, compressed))
        gsps = build_presentation_state(volume, labelmap, findings, numbering.by_value, provenance)
        objects.append(stored(OutputKind.GSPS, gsps))
        for image in build_key_images(volume, labelmap, findings, provenance):
            objects.append(stored(OutputKind.KEY_IMAGES, image))
    else:
        seg = None
        notes.append("no segment found: no SEG, SR, presentation state or key images")
    sr_uid = None
    if seg is not None:
        sr = build_measurement_report(findings, seg, numbering, provenance, flagged=flagged)
        objects.insert(1, stored(OutputKind.SR, sr))
        sr_uid = str(sr.SOPInstanceUID)
    slices = key_slices(labelmap, findings, options.key_images or 4, every=False)
    pictures = [render_slice(volume, labelmap, z, findings, provenance) for z in slices]
    pdf = build_pdf(findings, pictures, provenance, flagged=flagged)
    objects.append(stored(OutputKind.PDF, encapsulate_pdf(pdf, provenance)))
    bundle = build_bundle(findings, pdf, provenance, sr_uid=sr_uid, flagged=flagged)
    by_destination: dict[str, tuple[bytes, str]] = {}
    for name, rules in options.fhir_destinations.items():
        theirs = replace(provenance, options=replace(options, fhir=rules))
        by_destination[name] = (
            bundle_json(build_bundle(findings, pdf, theirs, sr_uid=sr_uid, flagged=flagged)),
            patient_search(theirs),
        )
    log.info(
        "results built",
        extra={
            "study_uid": provenance.study_uid,
            "objects": len(objects),
            "segments": len(numbering.by_value),
        },
    )
    return ResultSet(
        study_instance_uid=provenance.study_uid,
        findings=findings,
        dicom=tuple(objects),
        alternates=tuple(alternates),
        pdf=pdf,
        fhir_bundle=bundle_json(bundle),
        patient_search=patient_search(provenance),
        fhir_by_destination=by_destination,
        notes=tuple(notes),
        verdict=verdict,
    )
