"""C-STORE as ``pacs-node send`` does it, against a Storage SCP in this process: each file in
its own stored encoding, a warning counted as stored, a failure status and a refused SOP class
or encoding reported per file (the association goes on), and the outbox's outcomes read from
the same answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_node.cstore import accepted_pairs, associate, pair_contexts, store
from pacs_node.dispatch.destinations import DimseDestination
from pacs_node.dispatch.dimse import CStoreHandler
from pacs_node.dispatch.handler import Delivered, Parcel, Permanent, Transient
from pacs_node.scu import Peer, SendReport, scan, send
from tests.conftest import free_port
from tests.dicom_factory import write_series

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


class _Scp:
    """Takes CT in explicit VR little endian only; answers per instance as told."""

    def __init__(self, answers: dict[str, int]) -> None:
        self.answers = answers
        self.received: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="TESTSCP")
        ae.add_supported_context(CT_IMAGE, [ExplicitVRLittleEndian])
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received.append(
                (uid, str(event.context.transfer_syntax), bytes(event.request.DataSet.getvalue()))
            )
        return self.answers.get(uid, 0x0000)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    ct = write_series(tmp_path / "ct", slices=4, rows=8, columns=8)
    implicit = pydicom.dcmread(ct[3])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(ct[3], enforce_file_format=True)  # an encoding the SCP refuses
    (mr,) = write_series(tmp_path / "mr", modality="MR", slices=1, rows=8, columns=8)
    return [*ct, mr]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def scp(files: list[Path]) -> Iterator[_Scp]:
    server = _Scp({_uid(files[0]): 0xB000, _uid(files[1]): 0xA700})
    try:
        yield server
    finally:
        server.server.shutdown()


def test_send_reports_each_file_and_sends_the_stored_bytes(files: list[Path], scp: _Scp) -> None:
    report = SendReport()
    found = scan(files, report)
    done: list[int] = []
    send(found, Peer("TESTSCP", "127.0.0.1", scp.port), "PACSNODE_SCU", report, done.append)

    assert report.sent == 2  # a warning (0xB000) is stored
    assert sum(done) == len(files)
    failed = dict(report.failed)
    assert failed[files[1]].startswith("status 0xA700")
    assert failed[files[3]] == f"SOP class {CT_IMAGE} not accepted in {ImplicitVRLittleEndian}"
    assert failed[files[4]].startswith(f"SOP class {MR_IMAGE} not accepted")
    by_uid = {uid: (syntax, data) for uid, syntax, data in scp.received}
    assert set(by_uid) == {_uid(files[0]), _uid(files[1]), _uid(files[2])}
    syntax, data = by_uid[_uid(files[2])]
    assert syntax == ExplicitVRLittleEndian
    stored = files[2].read_bytes()
    assert stored.endswith(data)  # the data set as stored, after the file meta


def test_the_outbox_reads_the_same_answers_as_outcomes(files: list[Path], scp: _Scp) -> None:
    sop_classes = [CT_IMAGE] * 4 + [MR_IMAGE]
    syntaxes = [ExplicitVRLittleEndian] * 3 + [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    parcels = [
        Parcel(index, "seg", sop_class, _uid(path), {syntax: path})
        for index, (sop_class, syntax, path) in enumerate(
            zip(sop_classes, syntaxes, files, strict=True)
        )
    ]
    destination = DimseDestination(
        type="dimse",
        ae_title="TESTSCP",
        host="127.0.0.1",
        port=scp.port,
        timeout_s=10,
        storage_commitment=False,
    )
    outcomes = CStoreHandler("PACSNODE").send(destination, parcels)
    assert outcomes[0] == Delivered(ExplicitVRLittleEndian)
    assert isinstance(outcomes[1], Transient)  # out of resources: the peer may recover
    assert outcomes[1].reason.startswith("C-STORE status 0xA700")
    assert outcomes[2] == Delivered(ExplicitVRLittleEndian)
    assert isinstance(outcomes[3], Permanent)
    assert isinstance(outcomes[4], Permanent)


def test_a_store_on_a_released_association_is_not_sent(files: list[Path], scp: _Scp) -> None:
    pairs = [(CT_IMAGE, ExplicitVRLittleEndian)]
    assoc = associate("PACSNODE", "TESTSCP", "127.0.0.1", scp.port, pair_contexts(pairs))
    assert assoc.is_established
    accepted = accepted_pairs(assoc)
    assert accepted == set(pairs)
    assoc.release()
    result = store(assoc, CT_IMAGE, {ExplicitVRLittleEndian: files[2]}, accepted)
    assert (result.status, result.problem, result.stored) == (None, "association aborted", False)
    assert scp.received == []
