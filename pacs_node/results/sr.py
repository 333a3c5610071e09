"""TID 1500 Measurement Report (PS3.16 TID 1500) in a Comprehensive 3D SR, built by highdicom.

What IHE AI Results asks of it, and how this module does it:

- Procedure Reported names the imaging procedure analysed (by modality), not the algorithm.
- The observer is a device: the model, with the Device UID that changes with its version.
- One measurement group (TID 1411) per segment found, with the SEG segment's tracking
  identifier and UID, finding type and finding site, the model as algorithm identification, and
  a Referenced Segment (segment number only) with the source series, or for a single 2D image
  (radiograph, ultrasound) the source image. The finding site carries a laterality (CID 244
  left / right / bilateral) only for a paired structure, the one :attr:`Finding.laterality`
  gives (see :mod:`.measurements`), so the SR, PDF, key images and FHIR say the same.
- Measurements carry standard codes (SCT, DCM) and UCUM units; those no standard names
  (sphericity, components, extents, surface area) use the documented private scheme
  ``99PACSNODE`` declared in the Coding Scheme Identification Sequence (see :mod:`.codes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from pacs_node.imaging.volume import VolumeKind
from pacs_node.outputs import OutputKind
from pacs_node.quality.checks import Verdict
from pacs_node.results import codes
from pacs_node.results.measurements import Finding
from pacs_node.results.provenance import CHARSET, Provenance, code, utf8_sources
from pacs_node.results.seg import SegmentNumbering, tracking_id, tracking_uid


def private_scheme() -> CodingSchemeIdentificationItem:
    """The private coding scheme, declared in every SR that uses it."""
    return CodingSchemeIdentificationItem(
        designator=codes.PRIVATE_SCHEME,
        name=codes.PRIVATE_SCHEME_NAME,
        uid=codes.PRIVATE_SCHEME_UID,
        responsible_organization="pacs-node",
    )


def observer_context(provenance: Provenance) -> hd.sr.ObservationContext:
    """The model as the observing device (TID 1004)."""
    algorithm = provenance.algorithm
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=provenance.device_uid,
        name=algorithm.name[:64],
        manufacturer_name=algorithm.manufacturer[:64],
        model_name=f"{algorithm.name} {algorithm.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def quality_evaluations(flagged: Verdict) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the Qualitative Evaluations container, one TEXT item per failed
    quality check (a radiologist reads why the result needs care)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=QUALITATIVE_EVALUATIONS,
                value=f"Quality check failed ({failure.check}): {failure.message}."[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for failure in flagged.failures
        ],
        is_root=False,
        is_sr=True,
    )
    return container


def build_measurement_report(
    findings: Sequence[Finding],
    segmentation: Dataset | None,
    numbering: SegmentNumbering,
    provenance: Provenance,
    *,
    flagged: Verdict | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR: one group per finding that has a SEG segment, referencing it (none without one:
    a report that the model found nothing is still a report). ``flagged``: the quality checks
    the result failed, named in a Qualitative Evaluations container (TID 1500 row 12)."""
    volume = provenance.volume
    sources = utf8_sources(volume)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=provenance.algorithm.name[:64],
        version=provenance.algorithm.version[:64],
    )
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    single_image = volume.kind is VolumeKind.IMAGE
    for finding in findings:
        number = numbering.number(finding.segment.value)
        if segmentation is None or number is None or not finding.present:
            continue
        structure = finding.segment.structure
        tracking = hd.sr.TrackingIdentifier(
            uid=tracking_uid(provenance, finding.segment),
            identifier=tracking_id(finding.segment),
        )
        laterality = finding.laterality
        site = hd.sr.FindingSite(
            anatomic_location=code(structure.type),
            laterality=code(laterality.concept) if laterality is not None else None,
        )
        measurements = [
            hd.sr.Measurement(
                name=code(m.name),
                value=m.value,
                unit=code(m.unit),
                derivation=code(m.derivation) if m.derivation else None,
            )
            for m in finding.measurements()
        ]
        common = {
            "tracking_identifier": tracking,
            "finding_type": code(structure.type),
            "finding_category": code(structure.category),
            "finding_sites": [site],
            "algorithm_id": algorithm_id,
            "measurements": measurements,
        }
        if single_image:
            # One 2D image: a TID 1411 group whose Referenced Segment names the segment number
            # only, with the image it was drawn on. highdicom's TID 1410 (planar) group takes
            # only a Referenced Segmentation Frame, which it writes with both Referenced Frame
            # Number and Referenced Segment Number; the Image SOP Instance Reference Macro
            # (PS3.3 Table 10-3) allows one of them at a time (dciodvfy: an error each).
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number,
                source_images=[hd.sr.SourceImageForSegmentation.from_source_image(sources[0])],
            )
        else:
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=referenced,
                **common,  # type: ignore[arg-type]
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=observer_context(provenance),
        procedure_reported=code(codes.procedure_for(volume.modality)),
        imaging_measurements=groups,
        title=dcm_codes.DCM.ImagingMeasurementReport,
    )
    if flagged is not None and flagged.failures:
        report[0].ContentSequence.append(quality_evaluations(flagged))
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, segmentation] if segmentation is not None else sources,
        content=report,
        series_instance_uid=provenance.series_uid(OutputKind.SR),
        series_number=provenance.options.series_number(OutputKind.SR),
        sop_instance_uid=provenance.instance_uid(OutputKind.SR),
        instance_number=provenance.options.instance_number,
        manufacturer="pacs-node",
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=provenance.options.institution_name,
        contributing_equipment=[provenance.contributing_equipment()],
        specific_character_set=CHARSET,
        coding_schemes=[private_scheme()],
        series_description=provenance.description("AI SR"),
        manufacturer_model_name="pacs-node",
        software_versions=provenance.software_version,
        content_date=provenance.created.date(),
        content_time=provenance.created.time().replace(microsecond=0),
        series_date=provenance.created.date(),
        series_time=provenance.created.time().replace(microsecond=0),
    )
