"""Radiograph results: no millimetres without a pixel spacing, and sides judged by Patient
Orientation, on a phantom radiograph and on a real chest radiograph (RG1_UNCR from pydicom-data:
CR, MONOCHROME1, Patient Orientation L\\F, Pixel Spacing 0)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from phantom.render import TRAINING, render
from phantom.writers import dicom_datasets
from pydicom.data import get_testdata_file

from pacs_node.imaging import load_series
from pacs_node.inference.labelmap import Algorithm, Labelmap, ModelInfo, SegmentSpec
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from pacs_node.inference.vocabulary import structure
from pacs_node.results import OutputKind, build_results, codes, measure_labelmap
from pacs_node.results.overlay import legend_entries
from pacs_node.results.pdf import size_basis, table_rows
from pacs_node.results.seg import NOMINAL_PROJECTION_THICKNESS_MM, projection_pixel_measures

MODELS = Path(__file__).resolve().parents[2] / "models"
LUNGS = (SegmentSpec(1, structure("lung_left")), SegmentSpec(2, structure("lung_right")))
SIZE_NAMES = {"Area", "Width", "Height"}


def _content_names(items: pydicom.Sequence) -> Iterator[str]:
    for item in items:
        for code in item.get("ConceptNameCodeSequence", []):
            yield str(code.CodeMeaning)
        yield from _content_names(item.get("ContentSequence", []))


def test_pixel_spacing_zero_means_not_measurable_everywhere() -> None:
    case = render("DX", 7001, replace(TRAINING, pixel_mm=(2.8, 3.2)))
    (ds,) = dicom_datasets(case)
    ds.PixelSpacing = [0, 0]
    del ds.ImagerPixelSpacing
    volume = load_series([ds])
    assert not volume.spacing_known
    labelmap = Labelmap(case.labels.astype(np.uint8), LUNGS)
    info = ModelInfo(Algorithm("xr-test", "1.0.0", "test model"), ("DX",), LUNGS)
    results = build_results(volume, labelmap, info)
    findings = results.findings
    assert all(f.present and f.area_cm2 is None and f.width_mm is None for f in findings)
    # SR: no size items at all
    (sr,) = [o for o in results.dicom if o.kind is OutputKind.SR]
    names = set(_content_names(pydicom.dcmread(io.BytesIO(sr.data)).ContentSequence))
    assert not names & {c.meaning for c in (codes.AREA, codes.WIDTH, codes.HEIGHT)}
    assert codes.IMAGE_INTENSITY.meaning in names  # the rest of the report is there
    # SEG: no Pixel Measures rather than a zero spacing, and highdicom reads it back
    (seg_object,) = results.of_kind(OutputKind.SEG)
    seg = hd.seg.segread(io.BytesIO(seg_object.data))
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert seg.number_of_segments == 2
    # PDF: the table and the line above it say so
    columns, rows = table_rows(findings)
    assert "Area" in columns
    assert {row.values["Area"] for row in rows} == {"not measurable"}
    assert size_basis(findings).startswith("Sizes: not measurable")
    assert results.pdf.startswith(b"%PDF")  # its text is subset-font glyphs: checked above
    # key-image legend
    legend = [e.text for e in legend_entries(findings) if not e.warning]
    assert legend == [
        "Left lung: area not measurable (no pixel spacing)",
        "Right lung: area not measurable (no pixel spacing)",
    ]
    # key images keep the source's Patient Orientation (not one made up from the grid)
    for key in (o for o in results.dicom if o.kind is OutputKind.KEY_IMAGES):
        assert list(pydicom.dcmread(io.BytesIO(key.data)).PatientOrientation) == ["L", "F"]
    # FHIR: every size Observation without a value, with a data-absent reason
    bundle = json.loads(results.fhir_bundle)
    observations = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    sizes = [o for o in observations if o["code"]["text"].split(": ")[1] in SIZE_NAMES]
    assert len(sizes) == 6
    for observation in sizes:
        assert "valueQuantity" not in observation
        assert observation["dataAbsentReason"]["coding"][0]["code"] == "unknown"
        assert "not measurable" in observation["note"][0]["text"]
    assert all("valueQuantity" in o for o in observations if o not in sizes)
    report = next(e["resource"] for e in bundle["entry"] if "conclusion" in e["resource"])
    assert "Left lung: area not measurable" in report["conclusion"]
    assert "cm2" not in report["conclusion"]


def _patient_side(column: float, columns: int, orientation: list[str]) -> str:
    """The patient side of an image column, from Patient Orientation alone (row direction)."""
    toward = orientation[0][0]
    assert toward in ("L", "R")
    on_high_half = column > (columns - 1) / 2
    return (
        ("left" if toward == "L" else "right")
        if on_high_half
        else ("right" if toward == "L" else "left")
    )


def test_real_radiograph_sides_are_checked_by_patient_orientation(tmp_path: Path) -> None:
    """RG1 with a plausible 0.2 mm spacing: whichever side the model puts each lung on, a lung
    whose centroid lies on the other patient side is flagged, and one on its own side is not."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    orientation = [str(v) for v in ds.PatientOrientation]
    assert orientation == ["L", "F"]
    ds.PixelSpacing = [0.2, 0.2]
    volume = load_series([ds])
    labelmap = Runner(Registry(MODELS), threads=2).segment("xr-chest-lungs", volume).labelmap
    findings = {f.segment.name: f for f in measure_labelmap(volume, labelmap)}
    values = {s.name: s.value for s in labelmap.segments}
    for name, own in (("lung_left", "left"), ("lung_right", "right")):
        columns = np.nonzero(np.asarray(labelmap.labels[0]) == values[name])[1]
        assert columns.size > 1000, name
        side = _patient_side(float(columns.mean()), ds.Columns, orientation)
        finding = findings[name]
        assert finding.side_conflict is (side != own), (name, side, columns.mean())
        if finding.side_conflict:
            assert any("left/right swap" in w for w in finding.warnings())


def test_rg1_as_stored_gets_two_lung_fields_and_no_sizes() -> None:
    """RG1 with its Pixel Spacing 0: the network sees it as a 430 mm chest detector (the
    bundle's ``unknown_spacing_field_mm``), not as 1 mm pixels, which gave two slivers; each
    lung field covers a plausible share of the image, one in each half, and no size is given."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    orientation = [str(v) for v in ds.PatientOrientation]
    volume = load_series([ds])
    assert not volume.spacing_known
    labelmap = Runner(Registry(MODELS), threads=2).segment("xr-chest-lungs", volume).labelmap
    values = {s.name: s.value for s in labelmap.segments}
    labels = np.asarray(labelmap.labels[0])
    halves = set()
    for name in ("lung_left", "lung_right"):
        rows, columns = np.nonzero(labels == values[name])
        assert columns.size > 0.05 * labels.size, (name, columns.size)
        assert columns.max() - columns.min() > 0.15 * ds.Columns, name  # a field, not a sliver
        assert rows.max() - rows.min() > 0.25 * ds.Rows, name
        halves.add(_patient_side(float(columns.mean()), ds.Columns, orientation))
    assert halves == {"left", "right"}
    for finding in measure_labelmap(volume, labelmap):
        assert finding.area_cm2 is None
        assert finding.width_mm is None


def test_a_seg_of_a_projection_states_the_depth_it_represents() -> None:
    """Slice Thickness for a SEG's Pixel Measures without plane geometry: the source's own, else
    its Body Part Thickness, else the nominal 1 mm; none without Pixel Spacing or with planes."""
    ds = pydicom.Dataset()
    ds.PixelSpacing = [0.2, 0.25]
    measures = projection_pixel_measures(ds)
    assert measures is not None
    assert [float(v) for v in measures[0].PixelSpacing] == [0.2, 0.25]
    assert float(measures[0].SliceThickness) == NOMINAL_PROJECTION_THICKNESS_MM == 1.0
    ds.BodyPartThickness = 180
    assert float(projection_pixel_measures(ds)[0].SliceThickness) == 180.0  # type: ignore[index]
    ds.SliceThickness = 5
    assert float(projection_pixel_measures(ds)[0].SliceThickness) == 5.0  # type: ignore[index]
    ds.FrameOfReferenceUID = "1.2.3"
    ds.ImagePositionPatient = [0, 0, 0]
    assert projection_pixel_measures(ds) is None  # highdicom derives them from the planes
    del ds.PixelSpacing, ds.ImagePositionPatient
    assert projection_pixel_measures(ds) is None
