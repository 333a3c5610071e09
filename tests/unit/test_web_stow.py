"""STOW-RS through real HTTP requests: dicomweb-client and hand-made multipart bodies against the
web face, the stored bytes compared with what the Storage SCP stores for the same file."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from requests.exceptions import HTTPError
from sqlalchemy import select

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Counter, Instance, Role, Series, Study, StudyEvent
from pacs_node.config import NodeOptions, Settings
from pacs_node.errors import DataSetMismatch
from pacs_node.ingest import spool as spool_module
from pacs_node.ingest.receive import Announced, Receiver
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.stow import StowBody, multipart_boundary
from pacs_node.ingest.transport import ReceivedFile
from pacs_node.services import accounts
from pacs_node.statuses import DATASET_MISMATCH, OUT_OF_RESOURCES, PROCESSING_FAILURE
from pacs_node.web.auth import SESSION_COOKIE
from tests.conftest import STORESCU, free_port
from tests.dicom_factory import new_uid, write_series
from tests.web_node import PASSWORD, SETUP, WebNode, start_web_node, web_node

__all__ = ["web_node"]

DICOM_JSON = "application/dicom+json"
REFERENCED, FAILED, RETRIEVE_URL = "00081199", "00081198", "00081190"
SOP_INSTANCE, FAILURE_REASON = "00081155", "00081197"


def multipart(parts: Sequence[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(
    client: httpx.Client, parts: Sequence[bytes], path: str = "/dicomweb/studies"
) -> httpx.Response:
    body, content_type = multipart(parts)
    return client.post(path, content=body, headers={"Content-Type": content_type})


def stored_uids(response: httpx.Response) -> list[str]:
    items = response.json().get(REFERENCED, {}).get("Value", [])
    return [item[SOP_INSTANCE]["Value"][0] for item in items]


def failures(response: httpx.Response) -> list[tuple[str | None, int]]:
    items = response.json().get(FAILED, {}).get("Value", [])
    return [
        (item.get(SOP_INSTANCE, {}).get("Value", [None])[0], item[FAILURE_REASON]["Value"][0])
        for item in items
    ]


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its File Meta Information."""
    data = path.read_bytes()
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def catalogued(node: WebNode, uids: Sequence[str]) -> dict[str, Instance]:
    assert node.recorder.wait_idle(10)
    with node.catalog.sessions() as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids)))
        return {row.sop_instance_uid: row for row in rows}


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_series(tmp_path / "ct", slices=3, rows=16, columns=16)


@pytest.fixture
def dicomweb(web_node: WebNode) -> DICOMwebClient:
    token = web_node.tokens.get(Role.OPERATOR) or web_node.user("stow-operator", Role.OPERATOR)
    web_node.tokens[Role.OPERATOR] = token
    return DICOMwebClient(f"{web_node.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})


def test_dicomweb_client_stores_a_series_recorded_in_the_catalog(
    web_node: WebNode, dicomweb: DICOMwebClient, series: list[Path]
) -> None:
    datasets = [pydicom.dcmread(path) for path in series]
    response = dicomweb.store_instances(datasets)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    assert [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence] == uids
    assert "FailedSOPSequence" not in response
    # dicomweb-client sends its Host header without the port; the URLs follow the Host header
    assert response.RetrieveURL.endswith(f"/dicomweb/studies/{study_uid}")
    assert response.ReferencedSOPSequence[0].RetrieveURL.endswith(
        f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{uids[0]}"
    )
    rows = catalogued(web_node, uids)
    assert sorted(rows) == sorted(uids)
    assert all(row.calling_ae is None for row in rows.values())
    with web_node.catalog.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        assert study.calling_ae is None
        assert session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
    for row in rows.values():
        stored = pydicom.dcmread(web_node.spool.path(row.path))
        assert stored.file_meta.SourceApplicationEntityTitle in (None, "")
    with web_node.catalog.sessions() as session:
        event = session.scalars(
            select(StudyEvent).where(
                StudyEvent.study_id == study.id, StudyEvent.kind == "receiving"
            )
        ).one()
        assert event.detail == {"sender": "stow-operator"}


def test_stored_data_set_is_byte_identical_to_a_c_store(
    web_node: WebNode, series: list[Path], tmp_path: Path
) -> None:
    with web_node.client(Role.OPERATOR) as client:
        response = post(client, [series[0].read_bytes()])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    uid = stored_uids(response)[0]
    via_stow = web_node.spool.path(catalogued(web_node, [uid])[uid].path)

    options = NodeOptions(
        data_dir=tmp_path / "scp",
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        min_free_mb=0,
        promiscuous=True,
        fsync=False,
    )
    catalog = open_catalog(options.catalog_url)
    spool = Spool(options.spool_dir, fsync=False, min_free_bytes=0)
    recorder = CatalogRecorder(catalog, spool)
    recorder.start()
    scp = StorageSCP(Settings(node=options, peers=()), spool, recorder, catalog)
    scp.start()
    try:
        sent = subprocess.run(
            [STORESCU, "-aec", "PACSNODE", "127.0.0.1", str(scp.port), str(series[0])],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        assert recorder.wait_idle(10)
        with catalog.sessions() as session:
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
            via_c_store = spool.path(row.path)
            c_store_digest = row.sha256
    finally:
        scp.stop()
        recorder.stop()
        catalog.dispose()
    assert dataset_bytes(via_stow) == dataset_bytes(via_c_store) == dataset_bytes(series[0])
    assert catalogued(web_node, [uid])[uid].sha256 == c_store_digest


def test_a_bad_part_fails_while_the_rest_is_stored(
    web_node: WebNode, series: list[Path], tmp_path: Path
) -> None:
    # the File Meta Information names another SOP Instance than the data set
    uid = str(pydicom.dcmread(series[1]).SOPInstanceUID)
    other_uid = uid[:-1] + ("1" if uid[-1] != "1" else "2")
    mismatched = series[1].read_bytes().replace(uid.encode(), other_uid.encode(), 1)
    no_preamble = series[2].read_bytes()[128:]  # starts at DICM: taken as it is
    parts = [
        series[0].read_bytes(),
        b"this is not DICOM at all" * 10,
        mismatched,
        no_preamble,
    ]
    with web_node.client(Role.OPERATOR) as client:
        response = post(client, parts)
    assert response.status_code == 202, response.text
    expected = [str(pydicom.dcmread(series[i]).SOPInstanceUID) for i in (0, 2)]
    assert stored_uids(response) == expected
    failed = failures(response)
    assert failed[0] == (None, 0xC001)
    assert failed[1] == (other_uid, DATASET_MISMATCH)
    assert sorted(catalogued(web_node, expected)) == sorted(expected)
    with web_node.catalog.sessions() as session:
        counter = session.get(Counter, "failed_instances")
        assert counter is not None
        assert counter.value == 2


def test_only_failures_answer_409(web_node: WebNode, series: list[Path]) -> None:
    raw = series[0].read_bytes()
    uid = str(pydicom.dcmread(series[0]).SOPInstanceUID).encode()
    hostile = raw.replace(uid, b"x" * len(uid), 1)  # the meta's SOP Instance UID is no UID
    with web_node.client(Role.OPERATOR) as client:
        response = post(client, [b"garbage", b"DICM" + b"\x00" * 200, hostile])
    assert response.status_code == 409
    assert failures(response) == [(None, 0xC001), (None, 0xC001), (None, DATASET_MISMATCH)]
    assert REFERENCED not in response.json()


def test_an_instance_of_another_study_fails_on_a_study_resource(
    web_node: WebNode, series: list[Path], tmp_path: Path
) -> None:
    other = write_series(tmp_path / "other", slices=1, rows=16, columns=16)[0]
    study_uid = str(pydicom.dcmread(series[0]).StudyInstanceUID)
    with web_node.client(Role.OPERATOR) as client:
        response = post(
            client, [series[0].read_bytes(), other.read_bytes()], f"/dicomweb/studies/{study_uid}"
        )
        only_other = post(client, [other.read_bytes()], f"/dicomweb/studies/{study_uid}")
    assert response.status_code == 202
    assert stored_uids(response) == [str(pydicom.dcmread(series[0]).SOPInstanceUID)]
    other_uid = str(pydicom.dcmread(other).SOPInstanceUID)
    assert failures(response) == [(other_uid, DATASET_MISMATCH)]
    assert response.json()[RETRIEVE_URL]["Value"] == [
        f"{web_node.url}/dicomweb/studies/{study_uid}"
    ]
    assert only_other.status_code == 409
    assert catalogued(web_node, [other_uid]) == {}


@pytest.fixture
def small_node(tmp_path: Path) -> Iterator[WebNode]:
    node = start_web_node(tmp_path / "small", max_instance_mb=1)
    try:
        yield node
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()


def test_a_part_over_max_instance_mb_fails_while_the_rest_is_stored(
    small_node: WebNode, series: list[Path], tmp_path: Path
) -> None:
    big = write_series(tmp_path / "big", slices=1, rows=1024, columns=1024)[0]  # 2 MiB
    big_uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    with small_node.client(Role.OPERATOR) as client:
        response = post(client, [big.read_bytes(), series[0].read_bytes()])
        alone = post(client, [big.read_bytes()])
    assert response.status_code == 202
    assert failures(response) == [(big_uid, OUT_OF_RESOURCES)]
    assert stored_uids(response) == [str(pydicom.dcmread(series[0]).SOPInstanceUID)]
    assert alone.status_code == 413
    assert failures(alone) == [(big_uid, OUT_OF_RESOURCES)]
    assert list(small_node.spool.incoming.iterdir()) == []


def test_other_media_types_are_refused_415(web_node: WebNode) -> None:
    content_types = [
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=x',
        'multipart/related; type="application/dicom+xml"; boundary=x',
        "multipart/form-data; boundary=x",
        'multipart/related; type="application/dicom"',  # no boundary
    ]
    with web_node.client(Role.OPERATOR) as client:
        for content_type in content_types:
            response = client.post(
                "/dicomweb/studies", content=b"x", headers={"Content-Type": content_type}
            )
            assert response.status_code == 415, content_type


def test_unreadable_bodies_answer_400(web_node: WebNode, series: list[Path]) -> None:
    body, content_type = multipart([series[0].read_bytes()])
    headers = {"Content-Type": content_type}
    with web_node.client(Role.OPERATOR) as client:
        truncated = client.post("/dicomweb/studies", content=body[:-40], headers=headers)
        not_multipart = client.post("/dicomweb/studies", content=b"hello", headers=headers)
        empty = client.post(
            "/dicomweb/studies", content=body[body.rindex(b"--") - 34 :], headers=headers
        )
    assert truncated.status_code == 400
    assert "close delimiter" in truncated.json()["detail"]
    assert not_multipart.status_code == 400
    assert empty.status_code == 400
    assert list(web_node.spool.incoming.iterdir()) == []


def test_credentials_and_roles(web_node: WebNode, series: list[Path]) -> None:
    parts = [series[0].read_bytes()]
    with web_node.client(role=None) as anonymous:
        refused = post(anonymous, parts)
    assert refused.status_code == 401
    assert "Basic" in refused.headers["www-authenticate"]
    with web_node.client(Role.VIEWER) as viewer:
        assert post(viewer, parts).status_code == 403
        assert viewer.get("/upload").status_code == 403
    with web_node.client(role=None, follow_redirects=False) as anonymous:
        assert anonymous.get("/upload").status_code == 303
    accounts.create_user(web_node.catalog, "pacs", Role.OPERATOR, PASSWORD, SETUP)
    with web_node.client(role=None, auth=("pacs", PASSWORD)) as basic:
        assert post(basic, parts).status_code == 200


def test_a_session_needs_its_csrf_token(web_node: WebNode, series: list[Path]) -> None:
    accounts.create_user(web_node.catalog, "browser", Role.OPERATOR, PASSWORD, SETUP)
    principal = accounts.authenticate_password(web_node.catalog, "browser", PASSWORD)
    assert isinstance(principal, accounts.Principal)
    session = accounts.open_session(web_node.catalog, principal, timedelta(hours=1))
    with web_node.client(role=None, cookies={SESSION_COOKIE: session.cookie}) as browser:
        assert post(browser, [series[0].read_bytes()]).status_code == 403
        browser.headers["X-CSRF-Token"] = session.csrf_token
        assert post(browser, [series[0].read_bytes()]).status_code == 200
        page = browser.get("/upload")
    assert page.status_code == 200
    assert session.csrf_token in page.text
    assert "webkitdirectory" in page.text


def test_a_body_streams_through_in_small_chunks(web_node: WebNode, series: list[Path]) -> None:
    """The body is parsed as it arrives: a boundary split across chunks, one byte at a time
    through the parser, stores the same instances."""
    body, content_type = multipart([path.read_bytes() for path in series])
    boundary = multipart_boundary(content_type)
    assert boundary is not None
    receiver = Receiver(web_node.settings, web_node.spool, web_node.recorder, web_node.catalog)
    parts = StowBody(receiver, boundary)
    for offset in range(0, len(body), 7):
        parts.write(body[offset : offset + 7])
    results = parts.close()
    assert [result.status for result in results] == [0, 0, 0]

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(body), 1000):
            yield body[offset : offset + 1000]

    with web_node.client(Role.OPERATOR) as client:
        response = client.post(
            "/dicomweb/studies", content=chunks(), headers={"Content-Type": content_type}
        )
    assert response.status_code == 200
    assert len(stored_uids(response)) == 3


def test_a_failed_request_raises_in_dicomweb_client(
    dicomweb: DICOMwebClient, tmp_path: Path
) -> None:
    other = pydicom.dcmread(write_series(tmp_path / "x", slices=1, rows=8, columns=8)[0])
    with pytest.raises(HTTPError):
        dicomweb.store_instances([other], study_instance_uid=new_uid())


def test_part10_fronts_that_are_refused_say_why(web_node: WebNode, series: list[Path]) -> None:
    """A meta without its group length, an overlong meta and a part of another media type each
    fail with a reason; the epilogue after the close delimiter is ignored."""
    raw = series[0].read_bytes()
    without_group_length = raw[:132] + raw[144:]
    overlong = raw[:140] + (2**20).to_bytes(4, "little") + raw[144:]
    boundary = "b0undary"
    body, _ = multipart([without_group_length, overlong, raw], boundary)
    body = body.replace(
        b"Content-Type: application/dicom\r\n\r\n" + raw,
        b"Content-Type: application/dicom+json\r\n\r\n" + raw,
    )
    receiver = Receiver(web_node.settings, web_node.spool, web_node.recorder, web_node.catalog)
    parts = StowBody(receiver, boundary)
    parts.write(body + b"an epilogue")
    results = parts.close()
    assert [(r.status, r.stored) for r in results] == [(0xC001, False)] * 3
    assert "Group Length" in results[0].reason
    assert "too long" in results[1].reason
    assert "application/dicom+json" in results[2].reason
    assert list(web_node.spool.incoming.iterdir()) == []


def test_a_part_the_spool_cannot_open_fails_while_the_rest_is_stored(
    web_node: WebNode, series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Receiver.incoming
    calls: list[str] = []

    def incoming(self: Receiver, source_ae: str) -> ReceivedFile:
        calls.append(source_ae)
        if len(calls) == 2:  # the second part finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, source_ae)

    monkeypatch.setattr(Receiver, "incoming", incoming)
    with web_node.client(Role.OPERATOR) as client:
        response = post(client, [path.read_bytes() for path in series])
        alone = post(client, [series[1].read_bytes()])
    assert response.status_code == 202, response.text
    expected = [str(pydicom.dcmread(series[i]).SOPInstanceUID) for i in (0, 2)]
    assert stored_uids(response) == expected
    assert failures(response) == [(None, OUT_OF_RESOURCES)]
    assert sorted(catalogued(web_node, expected)) == sorted(expected)
    assert alone.status_code == 200  # the next request finds room again
    assert list(web_node.spool.incoming.iterdir()) == []


def test_an_unexpected_error_keeps_the_parts_stored_before_it(
    web_node: WebNode, series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Receiver.incoming
    calls: list[str] = []

    def incoming(self: Receiver, source_ae: str) -> ReceivedFile:
        calls.append(source_ae)
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return real(self, source_ae)

    monkeypatch.setattr(Receiver, "incoming", incoming)
    with web_node.client(Role.OPERATOR) as client:
        response = post(client, [path.read_bytes() for path in series])
    assert response.status_code == 202, response.text
    expected = [str(pydicom.dcmread(series[0]).SOPInstanceUID)]
    assert stored_uids(response) == expected
    assert failures(response) == [(None, PROCESSING_FAILURE)]
    assert sorted(catalogued(web_node, expected)) == expected
    assert list(web_node.spool.incoming.iterdir()) == []


def test_a_refused_instance_settles_its_early_fsync(
    web_node: WebNode, series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance refused before it is kept (its SOP Instance UID is not the announced one)
    cancels its queued fsync: no descriptor or pool slot stays behind, nothing is fsync'd."""
    monkeypatch.setattr(spool_module, "_pool", None)
    monkeypatch.setattr(web_node.spool, "sync_threads", 1)
    monkeypatch.setattr(web_node.spool, "fsync", True)
    release = threading.Event()
    synced: list[str] = []
    real_fsync = os.fsync

    def blocking_fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", blocking_fsync)
    busy_file = web_node.spool.incoming / "busy.part"
    busy_file.write_bytes(b"data")
    busy = web_node.spool.start_sync(busy_file)  # the one fsync thread is taken
    assert busy is not None
    deadline = time.monotonic() + 10
    while not synced and time.monotonic() < deadline:
        time.sleep(0.001)
    jobs: list[spool_module.FileSync | None] = []
    start_sync = web_node.spool.start_sync

    def recorded(path: Path) -> spool_module.FileSync | None:
        jobs.append(start_sync(path))
        return jobs[-1]

    monkeypatch.setattr(web_node.spool, "start_sync", recorded)
    receiver = Receiver(web_node.settings, web_node.spool, web_node.recorder, web_node.catalog)
    ds = pydicom.dcmread(series[0])
    received = receiver.incoming("")
    received.write(series[0].read_bytes())
    announced = Announced(
        sop_class_uids=(str(ds.SOPClassUID),),
        sop_instance_uid=new_uid(),  # not the data set's
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )
    try:
        with pytest.raises(DataSetMismatch):
            receiver.receive_instance(received, announced, "PEER")
        assert len(jobs) == 1
        assert jobs[0] is not None
        assert jobs[0].cancelled()
    finally:
        release.set()
        busy.result(10)
        pool = spool_module._pool
        if pool is not None:
            pool.executor.shutdown(wait=True)
    assert synced == ["busy.part"]
    assert list(web_node.spool.incoming.iterdir()) == [busy_file]
