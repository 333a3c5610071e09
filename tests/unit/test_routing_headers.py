"""The header routing reads of each series is recorded as its instances arrive: routing gets
the same facts from it as from the files, opens no file once it is recorded, and reads the files
of a series the catalog recorded before it kept them. The recorder keeps each series' leading and
ending instance in header order across batches, replacements and quarantined instances."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select, update

import pacs_node.routing.facts as facts_module
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Instance, Series
from pacs_node.catalog.studies import SeriesEnd, record_instances, series_headers
from pacs_node.errors import OutOfResources
from pacs_node.ingest.header import (
    parse_identifiers,
    parse_received,
    read_header,
    read_received_file,
)
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.ingest.spool import Spool
from pacs_node.refs import InstanceRef, RoutingHeader, header_order
from pacs_node.routing.facts import study_facts
from pacs_node.routing.files import read_studies
from pacs_node.routing.rules import SeriesFacts
from tests.corpus_series import stack_corpus_file
from tests.dicom_factory import (
    new_uid,
    restyle,
    write_enhanced_mr,
    write_requested_ct,
    write_series,
)

CALLING_AE = "CT1"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield cat
    cat.dispose()


def _receive(spool: Spool, path: Path, *, with_routing: bool = True) -> InstanceRef:
    """``path`` spooled and described as the receive path does it: one parse of the data set
    (:func:`~pacs_node.ingest.header.parse_received`), then the identifiers and the routing
    header from it."""
    ds = read_received_file(path)
    header = read_header(ds)
    stored = spool.store(
        header.study_uid, header.series_uid, header.sop_instance_uid, [path.read_bytes()]
    )
    return InstanceRef(
        header=header,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        path=stored.relpath,
        size_bytes=stored.size_bytes,
        received_at=datetime.now(UTC),
        calling_ae=CALLING_AE,
        sha256=stored.sha256,
        routing=read_routing_header(ds) if with_routing else None,
    )


def _record(catalog: Catalog, refs: Sequence[InstanceRef]) -> None:
    with catalog.sessions.begin() as session:
        outcome = record_instances(session, refs)
    assert outcome.quarantined == 0


def _facts(catalog: Catalog, spool: Spool, study_uid: str) -> list[SeriesFacts]:
    with catalog.sessions() as session:
        return study_facts(session, spool, study_uid)


def _from_files(directory: Path) -> list[SeriesFacts]:
    (study,), skipped = read_studies([directory], calling_ae=CALLING_AE)
    assert skipped == []
    return list(study.series)


def _forget_headers(catalog: Catalog) -> None:
    """The series rows as a catalog upgraded from before the headers were kept holds them."""
    with catalog.sessions.begin() as session:
        session.execute(update(Series).values(routing_first=None, routing_last=None))


def _corpus_ct(directory: Path) -> list[Path]:
    """A real scanner's CT header (GE, private groups included), stacked into a series."""
    return stack_corpus_file("CT_small.dcm", directory, slices=30, spacing_mm=5.0)


def _mr_series(directory: Path) -> list[Path]:
    paths = write_series(directory, modality="MR", slices=20, series_number=4)
    return restyle(paths, BodyPartExamined=None, SeriesDescription="t1_vibe_fs_tra_Leber")


CASES = {
    "ct": write_requested_ct,
    "corpus-ct": _corpus_ct,
    "enhanced-mr": write_enhanced_mr,
    "mr": _mr_series,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_headers_give_the_facts_the_files_give(
    case: str, catalog: Catalog, tmp_path: Path
) -> None:
    paths = CASES[case](tmp_path / "files")
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path) for path in paths]
    random.Random(7).shuffle(refs)  # arrival order is not instance order
    for start in range(0, len(refs), 7):
        _record(catalog, refs[start : start + 7])
    study_uid = refs[0].study_uid

    recorded = _facts(catalog, spool, study_uid)
    assert recorded == _from_files(tmp_path / "files")
    with catalog.sessions() as session:
        (row,) = session.scalars(select(Series))
        kept = series_headers(row)
    assert kept is not None
    ordered = sorted(refs, key=lambda r: header_order(r.header.instance_number, r.sop_instance_uid))
    assert (kept.first, kept.last) == (ordered[0].routing, ordered[-1].routing)
    _forget_headers(catalog)
    assert _facts(catalog, spool, study_uid) == recorded  # read from the spool, as before
    (series,) = recorded
    assert series.calling_ae == CALLING_AE
    if case == "ct":
        assert series.body_region.regions == ("CHEST", "ABDOMEN", "PELVIS")
        assert "requested procedure 'CT Thorax Abdomen / CT TAP w/ contrast / CT CHEST" in str(
            series.body_region
        )
    if case == "enhanced-mr":
        assert (series.slices, series.slice_thickness) == (10, 12.0)
        assert kept.first.image_orientation_patient == (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
        assert kept.first.pixel_spacing == (3.2, 3.2)
        assert "Body Part Examined 'HEAD'" in str(series.body_region)


def test_routing_opens_no_file_once_the_headers_are_recorded(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_requested_ct(tmp_path / "ct")
    spool = Spool(tmp_path / "spool")
    _record(catalog, [_receive(spool, path) for path in paths])
    study_uid = dcmread(paths[0]).StudyInstanceUID
    before = _facts(catalog, spool, study_uid)

    shutil.rmtree(spool.root)

    def no_file(*_args: object) -> Dataset:
        raise AssertionError("routing opened a spooled file")

    monkeypatch.setattr(facts_module, "read_received_file", no_file)
    assert _facts(catalog, spool, study_uid) == before


def test_a_series_recorded_without_headers_is_read_from_its_files(
    catalog: Catalog, tmp_path: Path
) -> None:
    paths = write_requested_ct(tmp_path / "ct")
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path, with_routing=False) for path in paths]
    _record(catalog, refs)
    with catalog.sessions() as session:
        (series,) = session.scalars(select(Series))
        assert series_headers(series) is None  # its ends are known, their headers are not
        assert series.routing_first is not None
    facts = _facts(catalog, spool, refs[0].study_uid)
    assert facts == _from_files(tmp_path / "ct")
    # the files were read: without them the request is unknown
    for path in spool.root.rglob("*.dcm"):
        path.unlink()
    (blind,) = _facts(catalog, spool, refs[0].study_uid)
    assert blind.body_region.regions == ()
    assert blind.slices == facts[0].slices


def _ends(catalog: Catalog) -> tuple[str, str] | None:
    with catalog.sessions() as session:
        (series,) = session.scalars(select(Series))
        if series.routing_first is None or series.routing_last is None:
            return None
        first = SeriesEnd.from_json(series.routing_first)
        last = SeriesEnd.from_json(series.routing_last)
        return first.sop_instance_uid, last.sop_instance_uid


def test_the_ends_follow_header_order_across_batches(catalog: Catalog, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", slices=6)
    restyle(paths[5:], InstanceNumber=None)  # unnumbered: after every numbered one
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path) for path in paths]
    sops = [ref.sop_instance_uid for ref in refs]
    seen: list[InstanceRef] = []
    for batch in ([2, 3], [1], [5], [4, 0]):
        _record(catalog, [refs[i] for i in batch])
        seen += [refs[i] for i in batch]
        ordered = sorted(
            seen, key=lambda r: header_order(r.header.instance_number, r.sop_instance_uid)
        )
        assert _ends(catalog) == (ordered[0].sop_instance_uid, ordered[-1].sop_instance_uid)
    assert _ends(catalog) == (sops[0], sops[5])


def test_a_replacement_that_is_an_end_updates_its_header(catalog: Catalog, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", slices=4)
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path) for path in paths]
    _record(catalog, refs)
    corrected = replace(refs[0].routing, series_description="CT THORAX")
    with catalog.sessions.begin() as session:
        outcome = record_instances(
            session,
            [
                replace(refs[0], sha256="0" * 64, replaces=True, routing=corrected, calling_ae="B"),
                replace(refs[2], sha256="1" * 64, replaces=True, routing=RoutingHeader()),
            ],
        )
    assert outcome.replaced == 2
    with catalog.sessions() as session:
        (series,) = session.scalars(select(Series))
        headers = series_headers(series)
    assert headers is not None
    assert (headers.first, headers.calling_ae) == (corrected, "B")
    assert headers.last == refs[3].routing  # the replaced middle instance is no end


def test_quarantined_instances_move_no_end(catalog: Catalog, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", slices=3)
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path) for path in paths]
    _record(catalog, refs[1:])
    held = replace(
        _receive(spool, restyle(paths[:1], SOPInstanceUID=new_uid())[0]),
        quarantine_reason="identity",
    )
    with catalog.sessions.begin() as session:
        assert record_instances(session, [held]).quarantined == 1
    assert _ends(catalog) == (refs[1].sop_instance_uid, refs[2].sop_instance_uid)


def test_a_series_recorded_before_the_headers_were_kept_stays_read_from_files(
    catalog: Catalog, tmp_path: Path
) -> None:
    paths = write_series(tmp_path / "ct", slices=3)
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path) for path in paths]
    _record(catalog, refs[1:])
    _forget_headers(catalog)
    _record(catalog, refs[:1])  # sorts first, but the other instances' headers were never read
    assert _ends(catalog) is None
    facts = _facts(catalog, spool, refs[0].study_uid)
    assert facts == _from_files(tmp_path / "ct")


def test_the_routing_header_survives_json_and_the_pipe_from_a_worker() -> None:
    header = RoutingHeader(
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY"),
        series_number=3,
        requested_procedures=("CT TAP",),
        image_position_patient=(-0.1, 2.5e-7, -1234.5678901234),
        image_orientation_patient=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        columns=512,
        contributing_equipment=(("pacs-node", (("Newcode1", "99IHE"),)), (None, ())),
    )
    text = json.dumps(header.to_json())
    assert RoutingHeader.from_json(json.loads(text)) == header
    assert pickle.loads(pickle.dumps(header)) == header  # SCP worker -> recorder
    assert RoutingHeader.from_json({}) == RoutingHeader()
    assert RoutingHeader().to_json() == {}


def test_a_single_valued_image_type_is_one_value() -> None:
    ds = Dataset()
    ds.ImageType = "ORIGINAL"
    assert read_routing_header(ds).image_type == ("ORIGINAL",)


def _encoded(ds: Dataset) -> BytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return BytesIO(buffer.getvalue())


def _instance(frames: int | None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.1"
    if frames is not None:
        ds.NumberOfFrames = frames
    request = Dataset()
    request.RequestedProcedureDescription = "MR HEAD"
    ds.RequestAttributesSequence = [request]
    ds.add_new(0x00430010, "LO", "VENDOR")
    ds.add_new(0x00431001, "LO", "private")
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    ds.PerFrameFunctionalGroupsSequence = [Dataset()]
    return ds


def test_a_single_frame_header_is_read_to_group_0040_a_multi_frame_one_to_the_shared_groups() -> (
    None
):
    single = parse_received(_encoded(_instance(None)), ExplicitVRLittleEndian)
    assert "RequestAttributesSequence" in single
    assert 0x00431001 not in single
    assert "SharedFunctionalGroupsSequence" not in single
    multi = parse_received(_encoded(_instance(2)), ExplicitVRLittleEndian)
    assert "SharedFunctionalGroupsSequence" in multi
    assert "PerFrameFunctionalGroupsSequence" not in multi
    assert 0x00431001 not in multi  # stepped over: no reader takes it


def test_a_large_document_past_the_identifiers_ends_the_parse_instead_of_refusing() -> None:
    ds = _instance(2)
    ds.add_new(0x00420011, "OB", b"\0" * 2 * 2**20)  # Encapsulated Document
    found = parse_received(_encoded(ds), ExplicitVRLittleEndian, limit=2**20)
    assert read_header(found).sop_instance_uid == "1.2.3.4"
    assert "RequestAttributesSequence" in found
    assert "SharedFunctionalGroupsSequence" not in found


def _everything() -> Dataset:
    """A data set with every attribute the identifiers and the routing header are read from."""
    ds = _instance(3)
    for keyword, value in {
        "PatientName": "Doe^Jane",
        "PatientID": "P1",
        "IssuerOfPatientID": "HOSP",
        "StudyDate": "20260101",
        "StudyTime": "120000",
        "AccessionNumber": "A1",
        "StudyDescription": "CT Thorax",
        "SeriesDescription": "Axial 1mm",
        "Modality": "CT",
        "Manufacturer": "Vendor",
        "BodyPartExamined": "CHEST",
        "ProtocolName": "Routine",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SeriesNumber": 3,
        "InstanceNumber": 7,
        "RequestedProcedureDescription": "CT CHEST",
        "ImagePositionPatient": [-100.0, -100.0, 5.0],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [0.7, 0.7],
        "Columns": 512,
        "ReconstructionDiameter": 358.4,
        "SliceThickness": 1.0,
        "SpacingBetweenSlices": 0.8,
    }.items():
        setattr(ds, keyword, value)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1", "L", "CT CHEST"
    ds.ProcedureCodeSequence = [code]
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "Newcode1", "99IHE"
    equipment = Dataset()
    equipment.Manufacturer = "pacs-node"
    equipment.PurposeOfReferenceCodeSequence = [purpose]
    ds.ContributingEquipmentSequence = [equipment]
    return ds


def test_the_receive_parse_keeps_every_attribute_its_readers_take() -> None:
    """RECEIVED_TAGS and the readers cannot drift apart: every value either reader takes is
    the same from the receive parse as from the whole data set."""
    ds = _everything()
    received = parse_received(_encoded(ds), ExplicitVRLittleEndian)
    whole = parse_identifiers(_encoded(ds), ExplicitVRLittleEndian, stop_when=lambda *_: False)
    assert 0x00431001 in whole
    assert 0x00431001 not in received
    header = read_header(whole)
    assert None not in (getattr(header, f.name) for f in fields(header))
    routing = read_routing_header(whole)
    missing = [f.name for f in fields(routing) if getattr(routing, f.name) == f.default]
    assert missing == []
    assert (read_header(received), read_routing_header(received)) == (header, routing)


def _content(text_bytes: int) -> list[Dataset]:
    """A Content Sequence of ``text_bytes`` of text, in items of 64 KiB."""
    items = []
    for _ in range(max(1, text_bytes // 2**16)):
        item = Dataset()
        item.ValueType = "TEXT"
        item.TextValue = "x" * 2**16
        item.is_undefined_length_sequence_item = True
        items.append(item)
    return items


@pytest.mark.parametrize("mib", [4, 20])
def test_a_structured_report_is_read_no_further_than_the_requests(mib: int) -> None:
    """An SR's Content Sequence (0040,A730) follows routing's last attribute of group 0040:
    it is neither built nor counted against the header limit (20 MiB is over it)."""
    ds = _instance(None)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.ContentSequence = _content(mib * 2**20)
    ds["ContentSequence"].is_undefined_length = True  # as SRs are mostly written
    found = parse_received(_encoded(ds), ExplicitVRLittleEndian)
    assert read_header(found).sop_instance_uid == "1.2.3.4"
    assert "RequestAttributesSequence" in found
    assert "ContentSequence" not in found


def _with_raw_sequence(ds: Dataset, tag: int, items: int) -> BytesIO:
    """``ds`` encoded with an undefined-length private sequence of ``items`` empty items at
    ``tag`` (pydicom would build an object per item)."""
    before, after = Dataset(), Dataset()
    for element in ds:
        (before if element.tag < tag else after).add(element)
    start = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
    raw = start + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * items
    raw += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return BytesIO(_encoded(before).getvalue() + raw + _encoded(after).getvalue())


def test_a_huge_sequence_before_the_identifiers_end_is_refused() -> None:
    ds = _instance(None)
    ds.add_new(0x00190010, "LO", "VENDOR")
    with pytest.raises(OutOfResources, match=r"\(0019,1010\)"):
        parse_received(_with_raw_sequence(ds, 0x00191010, 2**17 + 2**12), ExplicitVRLittleEndian)


def test_a_huge_optional_sequence_ends_the_parse_before_it() -> None:
    ds = _instance(2)
    ds.add_new(0x00290010, "LO", "VENDOR")
    encoded = _with_raw_sequence(ds, 0x00291010, 2**17 + 2**12)
    found = parse_received(encoded, ExplicitVRLittleEndian)
    assert read_header(found).sop_instance_uid == "1.2.3.4"
    assert "SharedFunctionalGroupsSequence" not in found  # after it: not read


def test_the_routing_header_keeps_codes_short() -> None:
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "v" * 10_000, "s" * 10_000
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = [purpose]
    ds = Dataset()
    ds.ContributingEquipmentSequence = [equipment]
    ((_, codes),) = read_routing_header(ds).contributing_equipment
    assert codes == (("v" * 64, "s" * 64),)


def _renumbered(ref: InstanceRef, number: int) -> InstanceRef:
    """``ref`` sent again (``resend_policy: replace``) with another Instance Number."""
    header = replace(ref.header, instance_number=number)
    return replace(ref, header=header, sha256="2" * 64, replaces=True)


def test_a_replacement_with_another_instance_number_moves_its_row_and_the_ends(
    catalog: Catalog, tmp_path: Path
) -> None:
    paths = write_series(tmp_path / "ct", slices=4)
    spool = Spool(tmp_path / "spool")
    refs = [_receive(spool, path) for path in paths]
    _record(catalog, refs)
    with catalog.sessions.begin() as session:
        record_instances(session, [_renumbered(refs[1], 20)])  # no end: now the last
    assert _ends(catalog) == (refs[0].sop_instance_uid, refs[1].sop_instance_uid)
    with catalog.sessions.begin() as session:
        record_instances(session, [_renumbered(refs[0], 10)])  # the first: where now?
    assert _ends(catalog) is None  # routing reads the files
    with catalog.sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.instance_number))
        numbers = {sop: number for sop, number in rows}
    assert numbers[refs[0].sop_instance_uid] == 10
    assert numbers[refs[1].sop_instance_uid] == 20
