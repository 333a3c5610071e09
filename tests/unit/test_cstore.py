"""C-STORE as ``pacs-node send`` does it, against a Storage SCP in this process: each file in
its own stored encoding, a warning counted as stored, a failure status and a refused SOP class
or encoding reported per file (the association goes on), and the outbox's outcomes read from
the same answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from pacs_node.cstore import accepted_pairs, associate, pair_contexts, store
from pacs_node.dimse_client import parked
from pacs_node.dispatch.destinations import DimseDestination
from pacs_node.dispatch.dimse import CStoreHandler
from pacs_node.dispatch.handler import Delivered, Parcel, Permanent, Transient
from pacs_node.scu import Peer, SendReport, scan, send
from tests.conftest import free_port, wait_for
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


def _late_reactor(assoc: Any, delay_s: float) -> None:
    """Make ``assoc``'s reactor thread, each time its checkpoint lets it go, run on only once
    an answer is queued (or ``delay_s`` passed): a thread the scheduler runs late, at the
    worst moment, every time, so the race of pynetdicom #875 happens on every request."""
    checkpoint = assoc._reactor_checkpoint
    wait = checkpoint.wait

    def late_wait(timeout: float | None = None) -> bool:
        woken = wait(timeout)
        end = time.monotonic() + delay_s
        while not assoc.dimse.msg_queue.queue and time.monotonic() < end:
            time.sleep(0.0001)
        return bool(woken)

    checkpoint.wait = late_wait


@pytest.fixture
def late_reactors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every association made runs its reactor late, and ``send_c_store`` is pynetdicom's
    own (not the tests' parked one): what the node's code does is all that protects it."""
    bare_send = Association.send_c_store.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(Association, "send_c_store", bare_send)
    associate_ = AE.associate

    def associate_late(self: AE, *args: Any, **kwargs: Any) -> Association:
        assoc = associate_(self, *args, **kwargs)
        _late_reactor(assoc, 0.3)
        return assoc

    monkeypatch.setattr(AE, "associate", associate_late)


def test_a_late_reactor_takes_no_answer_from_the_dimse_sender(
    files: list[Path], scp: _Scp, late_reactors: None
) -> None:
    """The outbox's C-STOREs on one association, its reactor thread resuming late after each
    answer: every request still gets its own status (a success with warning, an out of
    resources, a success, ...), none waits out the DIMSE timeout."""
    parcels = [
        Parcel(index, "seg", CT_IMAGE, _uid(path), {ExplicitVRLittleEndian: path})
        for index, path in enumerate([*files[:3], files[1], files[2]])
    ]
    destination = DimseDestination(
        type="dimse",
        ae_title="TESTSCP",
        host="127.0.0.1",
        port=scp.port,
        timeout_s=5,
        storage_commitment=False,
    )
    started = time.monotonic()
    outcomes = CStoreHandler("PACSNODE").send(destination, parcels)
    assert outcomes[0] == Delivered(ExplicitVRLittleEndian)
    assert isinstance(outcomes[1], Transient)
    assert outcomes[1].reason.startswith("C-STORE status 0xA700")
    assert outcomes[2] == Delivered(ExplicitVRLittleEndian)
    assert isinstance(outcomes[3], Transient)
    assert outcomes[4] == Delivered(ExplicitVRLittleEndian)
    assert len(outcomes) == len(scp.received) == 5
    assert time.monotonic() - started < 5


def test_a_late_reactor_takes_the_answer_of_a_bare_send(
    files: list[Path], scp: _Scp, late_reactors: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The same late reactor against pynetdicom's bare ``send_c_store``: an answer is taken by
    the reactor and its request left with no status (what the test above guards)."""
    pairs = [(CT_IMAGE, ExplicitVRLittleEndian)]
    assoc = associate(
        "PACSNODE", "TESTSCP", "127.0.0.1", scp.port, pair_contexts(pairs), timeout_s=1
    )
    assert assoc.is_established
    answers = []
    try:
        # the reactor's first wait may begin before it is made late: the second or third is hit
        for path in (files[0], files[2], files[2]):
            if not assoc.is_established:  # pynetdicom aborts after a DIMSE timeout
                break
            answers.append(assoc.send_c_store(path))
    finally:
        assoc.release()
    assert int(answers[0].Status) == 0xB000
    assert "Status" not in answers[-1]
    assert len(scp.received) == len(answers)  # sent and answered, the answer lost
    assert "Received unexpected C-STORE service message" in caplog.text


def test_parked_returns_at_once_on_an_association_that_is_gone(
    files: list[Path], scp: _Scp
) -> None:
    pairs = [(CT_IMAGE, ExplicitVRLittleEndian)]
    assoc = associate("PACSNODE", "TESTSCP", "127.0.0.1", scp.port, pair_contexts(pairs))
    assert assoc.is_established
    assoc.release()
    wait_for(lambda: not assoc.is_alive(), 5, 0.01, "the reactor to end")
    started = time.monotonic()
    assert parked(assoc, deadline_s=30) is assoc
    assert time.monotonic() - started < 1
