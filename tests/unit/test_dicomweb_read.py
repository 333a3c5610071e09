"""QIDO-RS and WADO-RS through real HTTP requests, read back with dicomweb-client: received
instances and the node's own results, a rejected result invisible, character sets decoded."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select, update

from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Instance, Job, Role
from pacs_node.catalog.results import StoredEncoding, add_result_rows, write_files
from pacs_node.services import qido
from tests.catalog_factory import ingest
from tests.dicom_factory import new_uid, write_series
from tests.web_node import WebNode, start_web_node

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GRAYSCALE_PS = "1.2.840.10008.5.1.4.1.1.11.1"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@dataclass
class Archive:
    node: WebNode
    ct_study: str
    ct_series: str
    ct_paths: dict[str, Path]  # SOP Instance UID -> spool file
    seg_series: str
    seg_instance: str
    echoed_series: str
    echoed_instance: str
    rejected_series: str
    rejected_instance: str
    rejected_echo_series: str
    rejected_echo_instance: str
    jp_study: str
    jp_series: str
    jp_instance: str
    jpeg_study: str
    jpeg_series: str
    jpeg_instance: str

    def client(self, role: Role | None = Role.VIEWER) -> httpx.Client:
        return self.node.client(role)

    def dicomweb(self) -> DICOMwebClient:
        if Role.VIEWER not in self.node.tokens:
            self.node.tokens[Role.VIEWER] = self.node.user("test-viewer", Role.VIEWER)
        token = self.node.tokens[Role.VIEWER]
        return DICOMwebClient(
            f"{self.node.url}/dicomweb", headers={"Authorization": f"Bearer {token}"}
        )


def _result(source: Path, sop_class: str, modality: str, number: int) -> StoredEncoding:
    """A result object of the node: a source slice re-labelled as a new series."""
    ds = dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = modality
    ds.SeriesNumber = number
    ds.SeriesDescription = f"AI {modality}"
    ds.InstanceNumber = 1
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return StoredEncoding(
        kind=modality.lower(),
        sop_class_uid=sop_class,
        sop_instance_uid=ds.SOPInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        encoding=ExplicitVRLittleEndian,
        data=out.getvalue(),
    )


def _job_with(node: WebNode, study_id: int, item: StoredEncoding, rejected: bool) -> None:
    results_dir = node.settings.node.data_dir / "results"
    with node.catalog.sessions.begin() as session:
        job_id = queue_job(session, study_id, "m", [], {})
        relpaths = write_files(results_dir, f"{job_id}/1", [item], fsync=False)
        add_result_rows(session, job_id, [item], relpaths)
        if rejected:
            session.execute(update(Job).where(Job.id == job_id).values(qa_decision="rejected"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("dicomweb")
    node = start_web_node(root / "var")
    try:
        spool = node.settings.node.spool_dir
        paths = write_series(root / "ct", slices=3, rows=32, columns=48, patient_name="Doe^Jane")
        study_id, ct_study, (ct_series,) = ingest(node.catalog, spool, paths)
        with node.catalog.sessions() as session:
            ct_paths = {
                uid: spool / rel
                for uid, rel in session.execute(select(Instance.sop_instance_uid, Instance.path))
            }
        seg = _result(paths[0], SEGMENTATION, "SEG", 900)
        _job_with(node, study_id, seg, rejected=False)
        withdrawn = _result(paths[0], COMPREHENSIVE_SR, "SR", 901)
        _job_with(node, study_id, withdrawn, rejected=True)
        # a result the PACS forwarded back to the node: received, and served once
        echoed = _result(paths[0], GRAYSCALE_PS, "PR", 902)
        _job_with(node, study_id, echoed, rejected=False)
        (root / "echoed.dcm").write_bytes(echoed.data)
        ingest(node.catalog, spool, [root / "echoed.dcm"])
        # a rejected result the PACS forwarded back: neither copy is served
        rejected_echo = _result(paths[0], ENCAPSULATED_PDF, "DOC", 903)
        _job_with(node, study_id, rejected_echo, rejected=True)
        (root / "rejected_echo.dcm").write_bytes(rejected_echo.data)
        ingest(node.catalog, spool, [root / "rejected_echo.dcm"])
        jp_file = Path(get_charset_files("chrH31.dcm")[0])
        _, jp_study, (jp_series,) = ingest(node.catalog, spool, [jp_file])
        jpeg_file = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
        _, jpeg_study, (jpeg_series,) = ingest(node.catalog, spool, [jpeg_file])
        assert seg.series_uid
        assert seg.sop_instance_uid
        assert withdrawn.series_uid
        assert withdrawn.sop_instance_uid
        assert echoed.series_uid
        assert echoed.sop_instance_uid
        assert rejected_echo.series_uid
        assert rejected_echo.sop_instance_uid
        yield Archive(
            node=node,
            ct_study=ct_study,
            ct_series=ct_series,
            ct_paths=ct_paths,
            seg_series=seg.series_uid,
            seg_instance=seg.sop_instance_uid,
            echoed_series=echoed.series_uid,
            echoed_instance=echoed.sop_instance_uid,
            rejected_series=withdrawn.series_uid,
            rejected_instance=withdrawn.sop_instance_uid,
            rejected_echo_series=rejected_echo.series_uid,
            rejected_echo_instance=rejected_echo.sop_instance_uid,
            jp_study=jp_study,
            jp_series=jp_series,
            jp_instance=str(dcmread(jp_file, stop_before_pixels=True).SOPInstanceUID),
            jpeg_study=jpeg_study,
            jpeg_series=jpeg_series,
            jpeg_instance=str(dcmread(jpeg_file, stop_before_pixels=True).SOPInstanceUID),
        )
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()


def _values(item: dict[str, dict[str, list[object]]], tag: str) -> list[object]:
    return list(item.get(tag, {}).get("Value", []))


STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


def test_studies_are_found_by_the_usual_keys(archive: Archive) -> None:
    client = archive.dicomweb()
    (ct,) = client.search_for_studies(search_filters={"PatientName": "doe*"})
    assert _values(ct, STUDY_UID) == [archive.ct_study]
    # the node's SEG result counts in the study, the forwarded-back PR once, the rejected SR not
    assert _values(ct, "00080061") == ["CT", "PR", "SEG"]
    assert _values(ct, "00201206") == [3]
    assert _values(ct, "00201208") == [5]
    assert ct["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{archive.ct_study}")
    by_modality = client.search_for_studies(search_filters={"ModalitiesInStudy": "SEG"})
    assert [_values(s, STUDY_UID) for s in by_modality] == [[archive.ct_study]]
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "SR"}) == []
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "DOC"}) == []
    in_range = client.search_for_studies(search_filters={"StudyDate": "20251231-20260102"})
    assert [_values(s, STUDY_UID) for s in in_range] == [[archive.ct_study]]
    # a key by its tag, and a field read from the stored header
    (by_tag,) = client.search_for_studies(
        search_filters={"00100020": "TEST-0001"}, fields=["PatientBirthDate"]
    )
    assert _values(by_tag, "00100030") == ["19700101"]
    (japanese,) = client.search_for_studies(search_filters={"PatientName": "*山田*"})
    assert _values(japanese, "00100010") == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]
    everything = client.search_for_studies()
    assert len(everything) == 3
    page = client.search_for_studies(limit=1, offset=1)
    assert [_values(s, STUDY_UID) for s in page] == [_values(everything[1], STUDY_UID)]


def test_series_and_instances_include_results_but_not_rejected_ones(archive: Archive) -> None:
    client = archive.dicomweb()
    series = client.search_for_series(archive.ct_study)
    found = {_values(s, SERIES_UID)[0]: _values(s, MODALITY) for s in series}
    assert len(series) == 3
    assert found == {
        archive.ct_series: ["CT"],
        archive.seg_series: ["SEG"],
        archive.echoed_series: ["PR"],
    }
    (seg,) = client.search_for_series(search_filters={"Modality": "SEG"})
    assert _values(seg, "0008103E") == ["AI SEG"]
    assert _values(seg, "00201209") == [1]
    instances = client.search_for_instances(archive.ct_study, archive.ct_series)
    assert sorted(_values(i, SOP_UID)[0] for i in instances) == sorted(archive.ct_paths)
    assert {(_values(i, "00280010")[0], _values(i, "00280011")[0]) for i in instances} == {(32, 48)}
    two = client.search_for_instances(archive.ct_study, limit=2, offset=3)
    # received first (the forwarded-back PR among them), then the results
    assert [_values(i, SOP_UID)[0] for i in two] == [archive.echoed_instance, archive.seg_instance]
    everywhere = client.search_for_instances(search_filters={"SOPClassUID": SEGMENTATION})
    assert [_values(i, SOP_UID) for i in everywhere] == [[archive.seg_instance]]
    assert client.search_for_instances(search_filters={"InstanceNumber": "2"}) != []
    # includefield=all: more of each level, read from the stored headers
    (study,) = client.search_for_studies(search_filters={"PatientID": "TEST-0001"}, fields=["all"])
    assert _values(study, "00100040") == ["O"]
    every = client.search_for_series(archive.ct_study, fields=["all"])
    assert {_values(s, "00180015")[0] for s in every} == {"CHEST"}
    (one,) = client.search_for_instances(
        search_filters={"SOPInstanceUID": archive.seg_instance}, fields=["all"]
    )
    assert _values(one, "00180050") == [2.5]
    assert "7FE00010" not in one
    assert (
        client.search_for_instances(search_filters={"SOPInstanceUID": archive.rejected_instance})
        == []
    )


def test_bad_searches_are_refused_and_long_answers_say_so(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    with archive.client(role=None) as anonymous:
        assert anonymous.get("/dicomweb/studies").status_code == 401
        assert anonymous.get(f"/dicomweb/studies/{archive.ct_study}").status_code == 401
    with archive.client() as client:
        unknown = client.get("/dicomweb/studies", params={"NoSuchKey": "1"})
        assert unknown.status_code == 400
        assert "NoSuchKey" in unknown.json()["detail"]
        unsupported = client.get("/dicomweb/studies", params={"ReferringPhysicianName": "X*"})
        assert unsupported.status_code == 400
        assert client.get("/dicomweb/studies", params={"StudyDate": "2026"}).status_code == 400
        assert client.get("/dicomweb/studies", params={"limit": "-1"}).status_code == 400
        for level in ("studies", "series", "instances"):
            for value in (str(10**20), "1" * 5000, "\u00b2"):
                for key in ("offset", "limit"):
                    huge = client.get(f"/dicomweb/{level}", params={key: value})
                    assert huge.status_code == 400, (level, key, value[:20])
                    assert key in huge.json()["detail"]
        assert client.get("/dicomweb/instances", params={"offset": str(10**9)}).json() == []
        empty = client.get("/dicomweb/studies", params={"PatientID": "nobody"})
        assert (empty.status_code, empty.json()) == (200, [])
        assert empty.headers["content-type"] == "application/dicom+json"
        monkeypatch.setattr(qido, "MAX_RESULTS", 2)
        cut = client.get("/dicomweb/instances")
        assert len(cut.json()) == 2
        assert "additional results" in cut.headers["warning"]
        asked = client.get("/dicomweb/instances", params={"limit": "2"})
        assert "warning" not in asked.headers


def _parts(response: httpx.Response) -> list[bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    pieces = response.content.split(b"--" + boundary)[1:-1]
    return [piece.split(b"\r\n\r\n", 1)[1][:-2] for piece in pieces]


def test_retrieve_gives_the_stored_bytes(archive: Archive) -> None:
    client = archive.dicomweb()
    sop, path = next(iter(archive.ct_paths.items()))
    ds = client.retrieve_instance(archive.ct_study, archive.ct_series, sop)
    assert ds.SOPInstanceUID == sop
    study = client.retrieve_study(archive.ct_study)
    assert sorted(d.SOPInstanceUID for d in study) == sorted(
        [*archive.ct_paths, archive.seg_instance, archive.echoed_instance]
    )
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    with archive.client() as http:
        series = http.get(
            f"/dicomweb/studies/{archive.ct_study}/series/{archive.ct_series}",
            headers={"Accept": accept},
        )
        assert series.status_code == 200
        assert sorted(_parts(series)) == sorted(p.read_bytes() for p in archive.ct_paths.values())
        url = f"/dicomweb/studies/{archive.ct_study}/series/{archive.ct_series}/instances/{sop}"
        assert _parts(http.get(url, headers={"Accept": accept})) == [path.read_bytes()]
        # the JPEG instance is not transcoded to the default syntax
        jpeg = (
            f"/dicomweb/studies/{archive.jpeg_study}/series/{archive.jpeg_series}"
            f"/instances/{archive.jpeg_instance}"
        )
        plain = 'multipart/related; type="application/dicom"'
        assert http.get(jpeg, headers={"Accept": plain}).status_code == 406
        rejected = (
            f"/dicomweb/studies/{archive.ct_study}/series/{archive.rejected_series}"
            f"/instances/{archive.rejected_instance}"
        )
        assert http.get(rejected, headers={"Accept": accept}).status_code == 404
        assert http.get("/dicomweb/studies/1.2.3.999/metadata").status_code == 404
        assert http.get("/dicomweb/studies/..%2F..%2Fetc/metadata").status_code in (400, 404)
        assert http.get("/dicomweb/studies/1.2.x/metadata").status_code == 400


def test_metadata_decodes_character_sets_and_points_at_bulk_data(archive: Archive) -> None:
    client = archive.dicomweb()
    meta = client.retrieve_instance_metadata(
        archive.jp_study, archive.jp_series, archive.jp_instance
    )
    assert meta["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]
    assert meta["00080005"]["Value"] == ["ISO_IR 192"]
    sop, path = next(iter(archive.ct_paths.items()))
    ct = client.retrieve_instance_metadata(archive.ct_study, archive.ct_series, sop)
    uri = ct["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{sop}/bulkdata/7FE00010")
    with archive.client() as http:
        bulk = http.get(uri)
    assert bulk.status_code == 200
    assert _parts(bulk) == [dcmread(path).PixelData]
    series = client.retrieve_series_metadata(archive.ct_study, archive.ct_series)
    assert len(series) == 3


def test_frames_and_rendered_images(archive: Archive) -> None:
    client = archive.dicomweb()
    sop, path = next(iter(archive.ct_paths.items()))
    (frame,) = client.retrieve_instance_frames(archive.ct_study, archive.ct_series, sop, [1])
    assert frame == dcmread(path).PixelData
    jpeg_path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    (compressed,) = client.retrieve_instance_frames(
        archive.jpeg_study,
        archive.jpeg_series,
        archive.jpeg_instance,
        [1],
        media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),),
    )
    assert compressed == get_frame(dcmread(jpeg_path).PixelData, 0, number_of_frames=1)
    png = client.retrieve_instance_rendered(
        archive.ct_study, archive.ct_series, sop, media_types=("image/png",)
    )
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size, image.mode) == ("PNG", (48, 32), "L")
    colour = client.retrieve_instance_rendered(
        archive.jpeg_study, archive.jpeg_series, archive.jpeg_instance, media_types=("image/png",)
    )
    assert Image.open(io.BytesIO(colour)).mode == "RGB"
    with archive.client() as http:
        base = f"/dicomweb/studies/{archive.ct_study}/series/{archive.ct_series}/instances/{sop}"
        assert http.get(f"{base}/frames/2").status_code == 404
        assert http.get(f"{base}/frames/x").status_code == 400
        # a repeated frame is sent once; a list longer than the cap, or a huge number, is refused
        repeated = http.get(f"{base}/frames/1,1,1")
        assert repeated.status_code == 200
        assert _parts(repeated) == [dcmread(path).PixelData]
        assert http.get(f"{base}/frames/" + ",".join(["1"] * 4097)).status_code == 400
        assert http.get(f"{base}/frames/" + "1" * 5000).status_code == 400
        jpeg = http.get(f"{base}/frames/1/rendered", headers={"Accept": "image/jpeg"})
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (48, 32)


def test_a_rejected_result_sent_back_by_the_pacs_is_not_served(archive: Archive) -> None:
    client = archive.dicomweb()
    uid = archive.rejected_echo_instance
    assert client.search_for_instances(search_filters={"SOPInstanceUID": uid}) == []
    assert client.search_for_series(search_filters={"Modality": "DOC"}) == []
    assert archive.rejected_echo_series not in {
        _values(s, SERIES_UID)[0] for s in client.search_for_series(archive.ct_study)
    }
    assert uid not in {_values(i, SOP_UID)[0] for i in client.search_for_instances()}
    assert uid not in {d.SOPInstanceUID for d in client.retrieve_study(archive.ct_study)}
    meta = client.retrieve_study_metadata(archive.ct_study)
    assert uid not in {_values(m, SOP_UID)[0] for m in meta}
    base = f"/dicomweb/studies/{archive.ct_study}/series/{archive.rejected_echo_series}"
    with archive.client() as http:
        for path in ("", "/metadata"):
            assert http.get(f"{base}{path}").status_code == 404
        for path in ("", "/metadata", "/frames/1", "/rendered", "/bulkdata/7FE00010"):
            assert http.get(f"{base}/instances/{uid}{path}").status_code == 404


def test_a_page_reads_only_the_result_files_it_needs(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_dir = archive.node.settings.node.data_dir / "results"
    read: list[Path] = []
    real = qido.header_or_none

    def counting(path: Path) -> Dataset | None:
        read.append(path)
        return real(path)

    monkeypatch.setattr(qido, "header_or_none", counting)
    client = archive.dicomweb()
    # pages full of received entities: no result file is read
    assert len(client.search_for_instances(limit=1)) == 1
    assert len(client.search_for_instances(search_filters={"InstanceNumber": "1"}, limit=1)) == 1
    assert len(client.search_for_series(search_filters={"Modality": "CT"}, limit=1)) == 1
    # ModalitiesInStudy: only the results of the studies the other keys match
    only = {"ModalitiesInStudy": "SEG", "PatientID": "nobody"}
    assert client.search_for_studies(search_filters=only) == []
    assert [p for p in read if results_dir in p.parents] == []
    # a page past the received instances still finds the results, header-borne keys checked
    (seg,) = client.search_for_instances(
        archive.ct_study, search_filters={"InstanceNumber": "1"}, limit=1, offset=2
    )
    assert _values(seg, SOP_UID) == [archive.seg_instance]
