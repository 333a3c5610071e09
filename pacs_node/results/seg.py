"""DICOM Segmentation (PS3.3 A.51) of a Labelmap, built by highdicom.

BINARY, or FRACTIONAL (probability) when the Labelmap carries probabilities; never LABELMAP,
which Orthanc 1.10 refuses and dciodvfy does not know. One segment per label found, numbered
1..N in the Labelmap's segment order, coded with the vocabulary's SNOMED CT category, type and
laterality modifier, its recommended CIELab colour and the model's algorithm identification.
Frames are matched to the source images by position (highdicom derives the per-frame Derivation
Image / Source Image references, purpose 121322), so reversed or gap-filled slices still point
at the right image; empty frames are omitted. Uncompressed by default: many viewers cannot
decode 1-bit JPEG 2000, which is built only as an optional second encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from pacs_node.errors import ResultsError
from pacs_node.imaging.volume import Volume, VolumeKind
from pacs_node.inference.labelmap import Algorithm, Labelmap, SegmentSpec
from pacs_node.outputs import OutputKind
from pacs_node.results.provenance import (
    CHARSET,
    Provenance,
    code,
    source_patient_orientation,
    utf8_sources,
)

NOMINAL_PROJECTION_THICKNESS_MM = 1.0  # Slice Thickness of a projection that states no depth

_FAMILIES = {
    str(c.meaning).lower(): c
    for c in (
        dcm_codes.DCM.ArtificialIntelligence,
        dcm_codes.DCM.MorphologicalOperations,
        dcm_codes.DCM.HistogramAnalysis,
        dcm_codes.DCM.DeformableModels,
    )
}


@dataclass(frozen=True)
class SegmentNumbering:
    """Which Labelmap value became which SEG segment number (the SR references these)."""

    by_value: dict[int, int]

    def number(self, value: int) -> int | None:
        return self.by_value.get(value)


def algorithm_identification(algorithm: Algorithm) -> hd.AlgorithmIdentificationSequence:
    """The model as SEG / SR algorithm identification (name, version, CID 7162 family)."""
    family = _FAMILIES.get(algorithm.family.lower(), dcm_codes.DCM.ArtificialIntelligence)
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=family,
        version=algorithm.version[:64],
        source=algorithm.manufacturer[:64],
    )


def segment_numbering(labelmap: Labelmap) -> SegmentNumbering:
    """Segments that have voxels, numbered 1..N in the Labelmap's order."""
    present = [s.value for s in labelmap.segments if np.any(labelmap.labels == s.value)]
    return SegmentNumbering({value: n for n, value in enumerate(present, start=1)})


def build_segmentation(
    volume: Volume,
    labelmap: Labelmap,
    provenance: Provenance,
    *,
    numbering: SegmentNumbering | None = None,
    jpeg2000: bool = False,
) -> hd.seg.Segmentation:
    """The SEG object (uncompressed, or JPEG 2000 lossless when ``jpeg2000``)."""
    numbering = numbering or segment_numbering(labelmap)
    if not numbering.by_value:
        raise ResultsError("no segment has any voxel: there is nothing to encode as DICOM-SEG")
    if labelmap.labels.shape != volume.voxels.shape:
        raise ResultsError("labelmap and volume grids differ")
    if not all(volume.sop_instance_uids):
        raise ResultsError("the volume has gap-filled slices without source images")
    algorithm = algorithm_identification(provenance.algorithm)
    descriptions = [
        _description(labelmap.segment(value), number, algorithm, provenance)
        for value, number in numbering.by_value.items()
    ]
    fractional = labelmap.probabilities is not None
    array = _pixels(labelmap, numbering, fractional)
    sources = utf8_sources(volume)
    _drop_unknown_spacing(sources[0])
    frame_uid = str(sources[0].get("FrameOfReferenceUID", "")) or None
    pixels: hd.Volume | NDArray[np.generic]
    if frame_uid is not None and volume.kind is VolumeKind.SERIES:
        channels: dict[Any, Any] | None = (
            {"SegmentNumber": list(range(1, len(descriptions) + 1))} if fractional else None
        )
        pixels = hd.Volume(
            array=array,
            affine=volume.affine_lps(),
            coordinate_system="PATIENT",
            frame_of_reference_uid=frame_uid,
            channels=channels,
        )
    else:
        pixels = array
    # The JPEG 2000 copy is a second encoding of the same SEG instance, not another object:
    # same SOP Instance UID and series, so a PACS holding either holds the one SEG.
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        fractional_type="PROBABILITY" if fractional else None,
        segment_descriptions=descriptions,
        series_instance_uid=provenance.series_uid(OutputKind.SEG),
        series_number=provenance.options.series_number(OutputKind.SEG),
        sop_instance_uid=provenance.instance_uid(OutputKind.SEG),
        instance_number=provenance.options.instance_number,
        manufacturer="pacs-node",
        manufacturer_model_name="pacs-node",
        software_versions=provenance.software_version,
        device_serial_number=provenance.options.device_serial_number,
        content_label="AI_SEGMENTATION",
        content_description=provenance.description("AI segmentation")[:64],
        series_description=provenance.description("AI SEG"),
        transfer_syntax_uid=JPEG2000Lossless if jpeg2000 else ExplicitVRLittleEndian,
        omit_empty_frames=True,
        contributing_equipment=[provenance.contributing_equipment()],
        specific_character_set=CHARSET,
        content_date=provenance.created.date(),
        content_time=provenance.created.time().replace(microsecond=0),
        series_date=provenance.created.date(),
        series_time=provenance.created.time().replace(microsecond=0),
        institution_name=provenance.options.institution_name,
        pixel_measures=projection_pixel_measures(sources[0]),
    )
    own = source_patient_orientation(sources[0])
    if own is not None and "PatientOrientation" not in seg:
        # a radiograph's SEG has no plane geometry: General Image asks for Patient Orientation
        # (type 2C), the source's own, or empty when it has none
        seg.PatientOrientation = own
    return seg


def projection_pixel_measures(source: Dataset) -> hd.PixelMeasuresSequence | None:
    """Pixel Measures for an image without plane position (radiograph, ultrasound); ``None``
    where highdicom derives them from plane geometry, or where the source has no Pixel Spacing
    (then the SEG has none either, as highdicom does).

    highdicom copies such a source's Pixel Spacing into the SEG but leaves Slice Thickness out
    when the source has none (projections have none), and then ``hd.seg.segread`` cannot read
    the SEG back (dciodvfy refuses it too when the source has a Frame of Reference). Passing the
    Pixel Measures to highdicom keeps its own construction: the source's Pixel Spacing, and as
    Slice Thickness the depth the image represents, the source's Slice Thickness if stated, else
    its Body Part Thickness (a projection spans the body part along the beam), else a nominal
    1 mm.
    """
    spacing = source.get("PixelSpacing")
    if not spacing or hd.spatial.get_image_coordinate_system(source) is not None:
        return None
    thickness = next(
        (
            float(value)
            for value in (source.get("SliceThickness"), source.get("BodyPartThickness"))
            if value not in (None, "") and float(value) > 0
        ),
        NOMINAL_PROJECTION_THICKNESS_MM,
    )
    return hd.PixelMeasuresSequence(pixel_spacing=list(spacing), slice_thickness=thickness)


def _drop_unknown_spacing(source: Dataset) -> None:
    """A Pixel Spacing of 0 (a CR that states none) would be copied by highdicom into the SEG's
    Pixel Measures, where dciodvfy refuses a zero: the SEG then states no spacing, as for a
    source without one. Only on this copy of the header, and only without plane geometry."""
    spacing = source.get("PixelSpacing")
    if (
        spacing
        and hd.spatial.get_image_coordinate_system(source) is None
        and not all(float(v) > 0 for v in spacing)
    ):
        del source.PixelSpacing


def _pixels(labelmap: Labelmap, numbering: SegmentNumbering, fractional: bool) -> NDArray[Any]:
    if not fractional:
        lut = np.zeros(int(labelmap.labels.max()) + 1, dtype=np.uint16)
        for value, number in numbering.by_value.items():
            if value < lut.size:
                lut[value] = number
        dtype = np.uint8 if len(numbering.by_value) < 256 else np.uint16
        return np.asarray(lut[labelmap.labels].astype(dtype))
    probabilities = labelmap.probabilities or {}
    planes = []
    for value in numbering.by_value:
        prob = probabilities.get(value)
        if prob is None:
            prob = (labelmap.labels == value).astype(np.float32)
        planes.append(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0))
    return np.asarray(np.stack(planes, axis=-1))


def _description(
    spec: SegmentSpec,
    number: int,
    algorithm: hd.AlgorithmIdentificationSequence,
    provenance: Provenance,
) -> hd.seg.SegmentDescription:
    structure = spec.structure
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.display[:64],
        segmented_property_category=code(structure.category),
        segmented_property_type=code(structure.type),
        algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid(provenance, spec),
        tracking_id=tracking_id(spec),
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )
    if structure.modifier is not None:
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(code(structure.modifier))
        ]
    return description


def tracking_uid(provenance: Provenance, spec: SegmentSpec) -> str:
    """One tracking UID per structure and result, shared by the SEG segment and the SR group."""
    return provenance.uid(OutputKind.SEG, f"tracking-{spec.structure.name}")


def tracking_id(spec: SegmentSpec) -> str:
    return f"{spec.structure.display} (label {spec.value})"[:64]
