"""The derived body region, table-driven: Body Part Examined terms, description keywords in
English, German and French, the size of the volume, the order of evidence, and the facts read
from headers (the same pure function for the node and for files)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.refs import RoutingHeader
from pacs_node.routing.facts import SeriesSample, geometry, header_order, series_facts
from pacs_node.routing.region import (
    Geometry,
    body_region,
    regions_in_text,
    regions_of_body_part,
    regions_of_geometry,
)

TRUNK = ("CHEST", "ABDOMEN", "PELVIS")


@pytest.mark.parametrize(
    ("value", "regions"),
    [
        ("HEAD", ("HEAD",)),
        ("BRAIN", ("HEAD",)),
        ("SKULL", ("HEAD",)),
        ("HEADNECK", ("HEAD", "NECK")),
        ("CHEST", ("CHEST",)),
        ("THORAX", ("CHEST",)),
        ("CHESTABDOMEN", ("CHEST", "ABDOMEN")),
        ("CHESTABDPELVIS", TRUNK),
        ("ABDOMENPELVIS", ("ABDOMEN", "PELVIS")),
        ("ABD", ("ABDOMEN",)),
        ("Chest_Abdomen", ("CHEST", "ABDOMEN")),  # separators and case do not matter
        ("TORSO", TRUNK),
        ("WHOLEBODY", ("WHOLEBODY",)),
        ("KNEE", ("EXTREMITY",)),
        ("LSPINE", ("SPINE",)),
        ("SCHAEDEL", ("HEAD",)),
        ("ABDOMEN PELVIS", ("ABDOMEN", "PELVIS")),  # not a term: read by its keywords
        ("OTHER", ()),
    ],
)
def test_body_part_examined(value: str, regions: tuple[str, ...]) -> None:
    assert regions_of_body_part(value) == regions


@pytest.mark.parametrize(
    ("text", "regions"),
    [
        ("CT THORAX", ("CHEST",)),
        ("CT CAP with contrast", TRUNK),
        ("TAP", TRUNK),
        ("CT C/A/P", TRUNK),
        ("ABD/PELV w contrast", ("ABDOMEN", "PELVIS")),
        ("CT-Thorax/Abdomen", ("CHEST", "ABDOMEN")),
        ("Lung 1.0 B70f", ("CHEST",)),
        ("CT Brain w/o", ("HEAD",)),
        ("SINUS coronal", ("HEAD",)),
        ("CT Head and Neck angio", ("HEAD", "NECK")),
        ("Thoracic spine bone", ("SPINE",)),  # the spine, not the chest
        ("CT Schädel nativ", ("HEAD",)),
        ("t1_vibe_fs_tra_Leber", ("ABDOMEN",)),
        ("Ganzkörper Polytrauma", ("WHOLEBODY",)),
        ("TDM thoraco-abdomino-pelvien", TRUNK),
        ("Scanner cérébral", ("HEAD",)),
        ("Knee WB", ("EXTREMITY",)),
        ("ARMS UP", ()),  # whole words only
        ("Axial 2.5mm B30f", ()),
        ("CAPSULE", ()),
    ],
)
def test_description_keywords(text: str, regions: tuple[str, ...]) -> None:
    assert regions_in_text(text) == regions


@pytest.mark.parametrize(
    ("z", "field", "axial", "regions"),
    [
        (180.0, 230.0, True, ("HEAD",)),
        (250.0, 280.0, True, ("HEAD",)),  # both limits inclusive
        (251.0, 230.0, True, ()),  # longer than a head: neck or below
        (None, 230.0, True, ()),  # length unknown: not a head
        (180.0, 290.0, True, ()),  # between head and torso
        (160.0, 300.0, True, ("TORSO",)),
        (1200.0, 500.0, True, ("TORSO",)),
        (None, 400.0, True, ("TORSO",)),
        (180.0, 230.0, False, ()),  # sagittal or coronal: the field is no cross-section
        (300.0, 400.0, False, ()),
    ],
)
def test_geometry(z: float | None, field: float, axial: bool, regions: tuple[str, ...]) -> None:
    assert regions_of_geometry(Geometry(z, field, axial)) == regions


def test_evidence_is_taken_in_order_and_named() -> None:
    thorax = [("series description", "CT THORAX")]
    head = Geometry(180.0, 230.0, True)
    assert str(body_region("HEAD", thorax, head)) == "HEAD (Body Part Examined 'HEAD')"
    assert str(body_region(None, thorax, head)) == "CHEST (series description 'CT THORAX')"
    assert str(body_region(None, [], head)) == (
        "HEAD (no body part or description; z extent 180 mm, field 230 mm)"
    )
    assert str(body_region("OTHER", [("study description", "Routine")], head)) == (
        "HEAD (Body Part Examined 'OTHER' names no known region; no description names a region; "
        "z extent 180 mm, field 230 mm)"
    )
    later = [("series description", "Axial 1mm"), ("study description", "CT ABDOMEN")]
    assert str(body_region(None, later, None)) == "ABDOMEN (study description 'CT ABDOMEN')"
    unknown = body_region(None, [], Geometry(400.0, 260.0, True))
    assert unknown.regions == ()
    assert unknown.evidence.endswith("z extent 400 mm, field 260 mm: neither head- nor torso-sized")
    assert body_region(None, [], None).evidence == "no body part or description; no usable geometry"


def test_examination_wide_words_are_settled_by_the_series_own_size() -> None:
    """A trauma study "CT HEAD AND CHEST": its thin head reconstruction must not reach a torso
    rule for the study's words, nor its body series lose the chest."""
    study = [("series description", "Axial 0.625 STND"), ("study description", "CT HEAD AND CHEST")]
    head, torso = Geometry(180.0, 230.0, True), Geometry(420.0, 380.0, True)
    assert body_region(None, study, head).regions == ("HEAD",)
    assert "this series is head-sized" in body_region(None, study, head).evidence
    assert body_region(None, study, torso).regions == ("CHEST",)
    assert body_region(None, study, None).regions == ("HEAD", "CHEST")  # nothing to settle it
    assert body_region("WHOLEBODY", [], head).regions == ("HEAD",)
    assert body_region("WHOLEBODY", [], torso).regions == ("WHOLEBODY",)
    # the series' own description is about this series alone: taken as written
    own = [("series description", "HEAD AND CHEST")]
    assert body_region(None, own, head).regions == ("HEAD", "CHEST")
    # words naming no trunk region are not mixed: they stand, whatever the size
    protocol = [("protocol name", "Polytrauma Head Neck")]
    assert body_region(None, protocol, torso).regions == ("HEAD", "NECK")
    both = [("protocol name", "Head + Chest/Abd/Pelvis")]
    assert body_region(None, both, torso).regions == TRUNK


def _header(z: float, number: int, **attributes: object) -> RoutingHeader:
    return read_routing_header(_slice(z, number, **attributes))


def _slice(z: float, number: int, **attributes: object) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = f"1.2.3.{number}"
    ds.InstanceNumber = number
    ds.Modality = "CT"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.Rows = ds.Columns = 512
    ds.PixelSpacing = [0.45, 0.45]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_geometry_from_the_leading_and_ending_headers() -> None:
    first, last = _header(0.0, 1), _header(-175.0, 36)  # 36 slices 5 mm apart, feet first
    found = geometry(SeriesSample("1", 36, first, last))
    assert found is not None
    assert found.z_extent_mm == pytest.approx(180.0)  # 175 mm between centres + one slice
    assert found.field_mm == pytest.approx(230.4)  # 512 columns x 0.45 mm
    assert found.axial
    with_diameter = _header(0.0, 1, ReconstructionDiameter=350)
    found = geometry(SeriesSample("1", 36, with_diameter, last))
    assert found is not None
    assert found.field_mm == 350.0
    sagittal = _header(0.0, 1, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    found = geometry(SeriesSample("1", 36, sagittal, _header(-175.0, 36)))
    assert found is not None
    assert not found.axial
    assert geometry(SeriesSample("1", 1, RoutingHeader(), RoutingHeader())) is None


def test_geometry_of_a_multi_frame_instance() -> None:
    header = _header(0.0, 1, NumberOfFrames=60, SliceThickness=3.0)
    found = geometry(SeriesSample("1", 1, header, header))
    assert found is not None
    assert found.z_extent_mm == pytest.approx(180.0)


def test_series_facts_carry_the_region_and_its_evidence() -> None:
    first, last = _header(0.0, 1), _header(-175.0, 36)
    facts = series_facts(SeriesSample("1.2", 36, first, last, "CT1"))
    assert facts.body_region.regions == ("HEAD",)
    assert str(facts.body_region) == (
        "HEAD (no body part or description; z extent 180 mm, field 230 mm)"
    )
    assert (facts.slices, facts.calling_ae, facts.series_description) == (36, "CT1", None)
    requested = _slice(0.0, 1)
    item = Dataset()
    item.RequestedProcedureDescription = "CT TAP"
    requested.RequestAttributesSequence = [item]
    facts = series_facts(SeriesSample("1.2", 36, read_routing_header(requested), last))
    assert str(facts.body_region) == "CHEST\\ABDOMEN\\PELVIS (requested procedure 'CT TAP')"


def test_the_leading_instance_is_the_lowest_number_then_uid() -> None:
    keys = [header_order(None, "1.1"), header_order(2, "1.0"), header_order(1, "1.9")]
    assert sorted(keys) == [
        header_order(1, "1.9"),
        header_order(2, "1.0"),
        header_order(None, "1.1"),
    ]
