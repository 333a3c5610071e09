"""The transport guard's pure parts, and a tripwire on the pynetdicom internals it hooks."""

from __future__ import annotations

import hashlib
import inspect
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import (
    association,
    dimse_messages,
    dul,
    events,
    fsm,
    service_class,
    transport,
)
from pynetdicom import dimse as pynetdicom_dimse
from pynetdicom.dimse_primitives import C_ECHO, N_CREATE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

from pacs_node.errors import OutOfResources, UnreadableDataset
from pacs_node.ingest import transport as guard_module
from pacs_node.ingest.header import HeaderTooLarge, parse_identifiers, read_spooled_header
from pacs_node.ingest.limits import Caps, SharedLimits, address_key
from pacs_node.ingest.part10 import file_meta
from pacs_node.ingest.spool import file_digest
from pacs_node.ingest.transport import (
    COMMAND_LIMIT_BYTES,
    OTHER_DATA_SET_LIMIT_BYTES,
    Guard,
    GuardedSocket,
    MessageSizes,
    ReceivedFile,
    Throttle,
    command_field,
)

# What ingest/transport.py relies on, read from pynetdicom 3.0.4. When pynetdicom changes any of
# these, re-read the module docstring of ingest/transport.py against the new code, then update.
HOOKED = {
    # reads the 6-byte header, then the declared length, through AssociationSocket.recv
    "dul.DULServiceProvider._read_pdu_data": (
        dul.DULServiceProvider._read_pdu_data,
        "19f2d4e38c13c835",
    ),
    "dul.DULServiceProvider.assoc": (dul.DULServiceProvider.assoc.fget, "394ab04d573893e8"),
    # loops on socket.recv; a short read (b"") ends the PDU
    "transport.AssociationSocket.recv": (transport.AssociationSocket.recv, "6bc20a33b1b7cfe7"),
    "transport.AssociationSocket.close": (transport.AssociationSocket.close, "c726c8db53813d55"),
    "transport.AssociationSocket.ready": (
        transport.AssociationSocket.ready.fget,
        "3eb58e3d39dc076d",
    ),
    # accepts; GuardedServer wraps what it returns
    "transport.AssociationServer.get_request": (
        transport.AssociationServer.get_request,
        "925a4f3a3042f6e4",
    ),
    "transport.RequestHandler.handle": (transport.RequestHandler.handle, "034823fb4df3a874"),
    # wraps the accepted socket (ours) in AssociationSocket as is
    "transport.RequestHandler._create_association": (
        transport.RequestHandler._create_association,
        "05c8d12b79863cdb",
    ),
    # NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm"): preamble, DICM, file meta, then
    # each data set fragment followed by .file.flush()
    "dimse_messages.DIMSEMessage.decode_msg": (
        dimse_messages.DIMSEMessage.decode_msg,
        "f51c777e841a76be",
    ),
    # closes and unlinks the temporary file after the EVT_C_STORE handler
    "service_class.StorageServiceClass.SCP": (
        service_class.StorageServiceClass.SCP,
        "63afca7fc6c6e7ee",
    ),
    # waits acse_timeout for the A-ASSOCIATE-RQ after EVT_CONN_OPEN
    "association.Association.run_reactor": (
        association.Association.run_reactor,
        "ed8bbbe3b3d6ddae",
    ),
    # pauses with time.sleep(0.001) before each look for a decoded DIMSE message
    "association.Association._run_reactor": (
        association.Association._run_reactor,
        "f28838c5559e462a",
    ),
    # pauses with time.sleep(self._run_loop_delay) when a loop found nothing to do
    "dul.DULServiceProvider.run_reactor": (
        dul.DULServiceProvider.run_reactor,
        "e3a10eb3a0931e48",
    ),
    # P-DATA is decoded on the DUL reactor's own thread
    "fsm.DT_2": (fsm.DT_2, "9ec543394e0b49eb"),
    "events.Event.dataset_path": (events.Event.dataset_path.fget, "7eba7552ff800249"),
    # keeps a request open until its data set's last fragment; stops at the PDV ending one
    "dimse.DIMSEServiceProvider.receive_primitive": (
        pynetdicom_dimse.DIMSEServiceProvider.receive_primitive,
        "5f99c86b14a15cef",
    ),
}


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_hooked_pynetdicom_internals_are_unchanged(name: str) -> None:
    function, expected = HOOKED[name]
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == expected, f"pynetdicom's {name} changed: re-check ingest/transport.py"


def test_hooked_names_exist() -> None:
    assert callable(dimse_messages.NamedTemporaryFile)  # type: ignore[attr-defined]
    assert hasattr(transport, "ThreadedAssociationServer")
    parameters = inspect.signature(transport.AssociationSocket.recv).parameters
    assert list(parameters) == ["self", "nr_bytes"]


# -- limits ------------------------------------------------------------------------------------


def _caps(**overrides: int) -> Caps:
    values = {
        "pending_total": 4,
        "pending_per_address": 2,
        "established_total": 3,
        "established_per_peer": 2,
    }
    values.update(overrides)
    return Caps(**values)


def test_pending_limits_per_address_and_in_total() -> None:
    limits = SharedLimits.create(_caps(), rows=1)
    first = limits.take_pending("10.0.0.1")
    second = limits.take_pending("10.0.0.1")
    assert first is not None
    assert second is not None
    assert limits.take_pending("10.0.0.1") is None
    assert limits.pending_limit("10.0.0.1") == "address"
    assert limits.take_pending("10.0.0.2") is not None
    assert limits.take_pending("10.0.0.3") is not None
    assert limits.take_pending("10.0.0.4") is None  # four pending in all
    assert limits.pending_limit("10.0.0.4") == "total"
    first.release()
    first.release()  # exactly once
    assert limits.pending() == 3
    assert limits.take_pending("10.0.0.1") is not None


def test_association_limits_per_peer_and_in_total_across_rows() -> None:
    table = SharedLimits.create(_caps(), rows=2)
    one, two = table.for_row(0), table.for_row(1)
    assert one.take_association("CT1", "10.0.0.1")[0] is not None
    assert two.take_association("CT1", "10.0.0.1")[0] is not None
    assert one.take_association("CT1", "10.0.0.1") == (None, "peer")
    assert two.take_association("CT2", "10.0.0.1")[0] is not None
    assert one.take_association("CT3", "10.0.0.9") == (None, "total")
    table.clear_row(1)  # worker 1 died
    assert table.established() == 1
    assert one.take_association("CT3", "10.0.0.9")[0] is not None


def _count_forever(table: SharedLimits, started: Any) -> None:
    while True:
        lease, _ = table.take_association("CT1", "10.0.0.1")
        started.set()
        if lease is not None:
            lease.release()


def test_a_worker_killed_while_counting_blocks_no_other() -> None:
    context = multiprocessing.get_context("fork")
    table = SharedLimits.create(_caps(established_per_peer=10), rows=2, context=context)
    for _attempt in range(3):
        started = context.Event()
        child = context.Process(target=_count_forever, args=(table.for_row(1), started))
        child.start()
        assert started.wait(30)
        os.kill(child.pid or 0, signal.SIGKILL)  # at any point, inside a count or not
        child.join()
        done = threading.Event()

        def count_on(done: threading.Event = done) -> None:
            table.clear_row(1)  # what the supervisor does before the replacement starts
            for _ in range(100):
                lease, _ = table.for_row(0).take_association("CT1", "10.0.0.1")
                assert lease is not None
                lease.release()
            done.set()

        threading.Thread(target=count_on, daemon=True).start()
        assert done.wait(10), "a dead worker left the table locked"
        assert table.established() == 0


def test_racing_rows_never_pass_a_cap() -> None:
    table = SharedLimits.create(_caps(established_total=3, established_per_peer=3), rows=2)
    lock = threading.Lock()
    held = [0, 0]  # now, most at once

    def run(limits: SharedLimits) -> None:
        for _ in range(2000):
            lease, _ = limits.take_association("CT1", "10.0.0.1")
            if lease is None:
                continue
            with lock:
                held[0] += 1
                held[1] = max(held)
            with lock:
                held[0] -= 1
            lease.release()

    threads = [threading.Thread(target=run, args=(table.for_row(i % 2),)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= held[1] <= 3
    assert table.established() == 0


def test_handles_of_one_row_in_one_process_share_its_lock() -> None:
    """Two threads adding to one row through two handles (for_row) are serialised: with a
    lock per handle, one's read-modify-write could overwrite the other's and leak a count."""
    table = SharedLimits.create(_caps(), rows=2)
    first, second = table.for_row(0), table.for_row(0)
    first._lock.acquire()
    try:
        added = threading.Thread(target=lambda: second.take_association("CT1", "10.0.0.1"))
        added.start()
        added.join(0.2)
        assert added.is_alive()  # waits for the row's one lock
        assert table.established() == 0
    finally:
        first._lock.release()
    added.join(10)
    assert table.established() == 1
    assert table.for_row(1)._lock is not first._lock  # rows do not wait on each other
    copy = pickle.loads(pickle.dumps(first))  # another process: locks of its own
    assert copy._lock is not first._lock
    assert copy.for_row(0)._lock is copy._lock


def test_an_ipv6_host_counts_by_its_64() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"


# -- the guarded socket ---------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[GuardedSocket, socket.socket, list[str]]]:
    counted: list[str] = []
    guard = Guard(
        limits=SharedLimits.create(_caps(), rows=1),
        pending=SharedLimits.create(_caps(), rows=1),
        count=counted.append,
        request_bytes=1024,
        data_bytes=16_384 + 6,
        request_timeout_s=0.5,
        read_timeout_s=0.5,
        incoming=tmp_path,
        max_instance_bytes=1000,
        throttle=Throttle(),
    )
    ours, peer = socket.socketpair()
    guarded = GuardedSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    lease = guard.pending.take_pending("127.0.0.1")
    assert lease is not None
    guarded.start_guard(guard, "127.0.0.1", lease)
    yield guarded, peer, counted
    guarded.close()
    peer.close()


def _header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def test_an_oversized_request_is_rejected_unread(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, counted = pair
    peer.sendall(_header(0x01, 256 * 2**20) + b"x" * 100)
    assert guarded.recv(6) == b""
    peer.settimeout(2)
    # A-ASSOCIATE-RJ: permanent, service provider (presentation), local-limit-exceeded
    assert peer.recv(10) == bytes.fromhex("03000000000400010302")
    assert counted == ["oversized_pdus"]
    assert guarded.guard.pending.pending() == 0


def test_frames_are_followed_and_p_data_capped_once_requested(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, counted = pair
    peer.sendall(_header(0x01, 10) + b"0123456789" + _header(0x04, 16_384 + 6))
    assert guarded.recv(6) == _header(0x01, 10)
    assert guarded.recv(4096) == b"0123456789"  # never past the frame
    assert guarded.requested
    assert guarded.guard.pending.pending() == 0
    assert guarded.recv(6) == _header(0x04, 16_384 + 6)
    peer.sendall(_header(0x04, 16_384 + 7))
    guarded._body_left = 0  # as if the body had been read
    assert guarded.recv(6) == b""
    peer.settimeout(2)
    assert peer.recv(10) == bytes.fromhex("07000000000400000206")  # A-ABORT, invalid parameter
    assert counted == ["oversized_pdus"]


def test_a_stalled_read_times_out(pair: tuple[GuardedSocket, socket.socket, list[str]]) -> None:
    guarded, peer, counted = pair
    peer.sendall(_header(0x01, 4) + b"ab")
    assert guarded.recv(6) == _header(0x01, 4)
    assert guarded.recv(2) == b"ab"
    assert guarded.recv(2) == b""  # nothing more came within the request deadline
    assert counted == ["idle_connections_closed"]


# -- header reading -----------------------------------------------------------------------------


def _dataset(private_bytes: int = 0) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    if private_bytes:
        ds.add_new(0x00090010, "LO", "BOMB")
        ds.add_new(0x00091010, "OB", b"\0" * private_bytes)
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.1"
    ds.Rows = 1
    return ds


def _encoded(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _deflated(ds: Dataset) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(_encoded(ds)) + compressor.flush()


def test_deflated_header_is_read_without_the_rest() -> None:
    ds = parse_identifiers(BytesIO(_deflated(_dataset())), DeflatedExplicitVRLittleEndian)
    assert ds.StudyInstanceUID == "1.2.3"
    assert "Rows" not in ds  # group 0x0028 is past what the catalog reads


def test_a_deflate_bomb_in_the_leading_groups_stops_at_the_cap() -> None:
    bomb = _deflated(_dataset(private_bytes=8 * 2**20))
    assert len(bomb) < 64 * 2**10
    with pytest.raises(HeaderTooLarge) as caught:
        parse_identifiers(BytesIO(bomb), DeflatedExplicitVRLittleEndian, limit=2**20)
    assert isinstance(caught.value, OutOfResources)


def test_an_uncompressed_header_is_capped_too() -> None:
    buffer = BytesIO(_encoded(_dataset(private_bytes=2 * 2**20)))
    with pytest.raises(HeaderTooLarge):
        parse_identifiers(buffer, ExplicitVRLittleEndian, limit=2**20)


def test_spooled_header_stops_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "one.dcm"
    ds = _dataset()
    ds.file_meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax=DeflatedExplicitVRLittleEndian,
    )
    ds.save_as(path, enforce_file_format=True)
    header = read_spooled_header(path, lambda tag, vr, length: int(tag.group) > 0x0010)
    assert header.PatientID == "P1"
    assert "StudyInstanceUID" not in header


# -- the received file ----------------------------------------------------------------------------


def _pynetdicom_writes(target: Any, payload: bytes) -> None:
    """What decode_msg writes: preamble, DICM, pynetdicom's file meta, then fragments."""
    target.write(b"\x00" * 128)
    target.write(b"DICM")
    write_file_meta_info(
        target,
        create_file_meta(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid="1.2.3.4",
            transfer_syntax=ExplicitVRLittleEndian,
        ),
    )
    for start in range(0, len(payload), 300):
        target.write(payload[start : start + 300])
        target.file.flush()


def test_received_file_is_our_part10_file(tmp_path: Path) -> None:
    payload = _encoded(_dataset())
    received = ReceivedFile(tmp_path, 10_000, "CT1")
    _pynetdicom_writes(received, payload)
    received.finish()
    meta = file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", ExplicitVRLittleEndian, "CT1")
    data = received.path.read_bytes()
    assert data == meta + payload
    assert received.dataset_offset == len(meta)
    assert received.sha256 == hashlib.sha256(payload).hexdigest()
    assert received.sha256 == file_digest(received.path)  # the spool's own digest agrees
    read = pydicom.dcmread(received.path)
    assert read.file_meta.SourceApplicationEntityTitle.strip() == "CT1"
    assert read.StudyInstanceUID == "1.2.3"


def test_received_file_over_the_cap_keeps_nothing(tmp_path: Path) -> None:
    received = ReceivedFile(tmp_path, 1000, "CT1")
    _pynetdicom_writes(received, b"\0" * 5000)
    assert received.oversized
    assert received.dataset_bytes == 5000
    received.finish()
    assert received.path.stat().st_size == 0


def test_an_unclaimed_received_file_is_deleted_once(tmp_path: Path) -> None:
    received = ReceivedFile(tmp_path, 1000, "CT1")
    claimed = ReceivedFile(tmp_path, 1000, "CT1")
    assert claimed.claim()
    for item in (received, claimed):
        item.discard()
    assert not received.path.exists()
    assert claimed.path.exists()
    assert not received.claim()


def test_a_connection_keeps_no_callback_for_files_already_settled(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, _peer, _counted = pair
    requestor = SimpleNamespace(ae_title="CT1")
    assoc = SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=guarded)))
    assoc.requestor = requestor
    open_at_close: list[ReceivedFile] = []

    def receive() -> None:
        threading.current_thread().assoc = assoc  # type: ignore[attr-defined]
        for _ in range(50):  # C-STOREs answered: each claimed its file
            received = guard_module._temporary_file()
            assert received.claim()
            received.remove()
        guard_module._temporary_file().discard()
        open_at_close.append(guard_module._temporary_file())  # still arriving at close

    thread = threading.Thread(target=receive)
    thread.start()
    thread.join()
    assert len(guarded._on_close) == 1
    guarded.close()
    assert not open_at_close[0].path.exists()


def test_throttle_logs_the_first_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    throttle = Throttle(interval_s=60)
    caplog.set_level("WARNING", logger=guard_module.__name__)
    for _ in range(5):
        throttle.warning("kind", "refused", {})
    assert len(caplog.records) == 1


def test_the_temporary_file_hook_is_installed() -> None:
    guard_module.install_received_files()
    assert dimse_messages.NamedTemporaryFile is guard_module._temporary_file  # type: ignore[attr-defined]
    assert threading.current_thread() is not None


# -- DIMSE message sizes --------------------------------------------------------------------------


def _pdv(value: bytes, *, command: bool, last: bool) -> bytes:
    control = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">LBB", len(value) + 2, 1, control) + value


def _command(field: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, 0x0100, 2, field)


def _feed(sizes: MessageSizes, stream: bytes, step: int = 4096) -> bool:
    return all(sizes.follow(stream[i : i + step]) for i in range(0, len(stream), step))


def test_command_field_is_read_from_an_implicit_command_set() -> None:
    assert command_field(struct.pack("<HHI", 0, 2, 4) + b"1.2\0" + _command(0x0030)) == 0x0030
    assert command_field(b"\x00\x00") is None


def test_a_c_store_data_set_may_be_large_but_other_messages_may_not() -> None:
    store = _pdv(_command(0x0001), command=True, last=True)
    chunk = _pdv(b"\0" * 65_536, command=False, last=False)
    over = OTHER_DATA_SET_LIMIT_BYTES // 65_536 + 1
    assert _feed(MessageSizes(), store + chunk * over)
    echo = _pdv(_command(0x0030), command=True, last=True)
    assert not _feed(MessageSizes(), echo + chunk * over)
    # a finished C-STORE does not lend its allowance to the next message
    sizes = MessageSizes()
    assert _feed(sizes, store + _pdv(b"\0" * 10, command=False, last=True))
    assert not _feed(sizes, echo + chunk * over)


def test_an_endless_command_set_is_refused() -> None:
    fragment = _pdv(b"\0" * 4096, command=True, last=False)
    assert not _feed(MessageSizes(), fragment * (COMMAND_LIMIT_BYTES // 4096 + 1))


def test_what_is_held_after_the_connection_closed_is_given_back(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, _peer, _counted = pair
    limits = guarded.guard.limits
    lease, _ = limits.take_association("CT1", "127.0.0.1")
    assert lease is not None
    guarded.close()
    guarded.hold_association(lease)  # EVT_REQUESTED ran after the peer went away
    assert limits.established() == 0
    assert guarded.guard.pending.pending() == 0


# -- the shortcuts in pynetdicom's receive --------------------------------------------------------


def _shortcut_writes(target: Any, payload: bytes) -> None:
    """What decode_msg writes once install_received_files() replaced its file-meta helpers."""
    target.write(b"\x00" * 128)
    target.write(b"DICM")
    guard_module._write_file_meta_info(
        target,
        guard_module._create_file_meta(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid="1.2.3.4",
            transfer_syntax=ExplicitVRLittleEndian,
        ),
    )
    for start in range(0, len(payload), 300):
        target.write(payload[start : start + 300])
        target.file.flush()


def test_the_file_meta_shortcut_writes_the_same_received_file(tmp_path: Path) -> None:
    payload = _encoded(_dataset())
    files = []
    for writes in (_pynetdicom_writes, _shortcut_writes):
        received = ReceivedFile(tmp_path, 10_000, "CT1")
        writes(received, payload)
        received.finish()
        files.append((received.path.read_bytes(), received.meta_uids, received.sha256))
    assert files[0] == files[1]


def test_the_file_meta_shortcut_writes_pydicom_meta_to_any_other_file() -> None:
    class Plain(BytesIO):
        file = property(lambda self: self)

    expected, shortcut = Plain(), Plain()
    _pynetdicom_writes(expected, b"payload!")
    _shortcut_writes(shortcut, b"payload!")
    assert shortcut.getvalue() == expected.getvalue()


def test_the_file_meta_shortcut_refuses_a_uid_it_cannot_write(tmp_path: Path) -> None:
    received = ReceivedFile(tmp_path, 10_000, "CT1")
    received.write(b"\x00" * 128 + b"DICM")
    received.start("1.2.840.10008.5.1.4.1.1.7", "1.2.3.\u00e9", ExplicitVRLittleEndian)
    received.write(b"\0" * 10)
    with pytest.raises(UnreadableDataset):
        received.finish()


@pytest.mark.parametrize("sop_class_uid", [None, "", "\0"])
def test_a_request_without_its_sop_class_uid_is_refused_not_written(
    tmp_path: Path, sop_class_uid: str | None
) -> None:
    """An absent or empty Affected SOP Class UID never becomes "None" or "" in our header:
    the data set is refused (a failure status; the association goes on)."""
    received = ReceivedFile(tmp_path, 10_000, "CT1")
    received.write(b"\x00" * 128 + b"DICM")
    guard_module._write_file_meta_info(
        received,
        guard_module._create_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid="1.2.3.4",
            transfer_syntax=ExplicitVRLittleEndian,
        ),
    )
    received.write(_encoded(_dataset()))
    with pytest.raises(UnreadableDataset, match="Affected SOP Class UID"):
        received.finish()
    assert received.meta_uids is None
    assert b"None" not in received.path.read_bytes()


def test_an_absent_uid_stays_none_in_pydicom_meta_for_any_other_file() -> None:
    meta = guard_module._create_file_meta(
        sop_class_uid=None, sop_instance_uid="1.2.3.4", transfer_syntax=ExplicitVRLittleEndian
    )
    written: list[Any] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            guard_module,
            "_pydicom_write_file_meta_info",
            lambda fp, file_meta, enforce_standard=True: written.append(file_meta),
        )
        guard_module._write_file_meta_info(BytesIO(), meta)
    assert len(written) == 1
    assert written[0].MediaStorageSOPClassUID in (None, "")
    assert written[0].MediaStorageSOPClassUID != "None"


def test_a_guarded_pdu_body_is_asked_for_in_bounded_steps(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    """A 1 MiB body is never asked for whole: CPython reserves a recv's buffer before it
    blocks (and TLS hands over about 16 KiB a call), so each step is at most 256 KiB."""
    guarded, _peer, _counted = pair
    calls: list[int] = []

    def giving(self: GuardedSocket, bufsize: int, flags: int = 0) -> bytes:
        calls.append(bufsize)
        return b"\1" * min(bufsize, 100_000)

    association_socket = SimpleNamespace(socket=guarded)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GuardedSocket, "recv", giving)
        read = guard_module._association_recv(association_socket, 2**20)  # type: ignore[arg-type]
    assert len(read) == 2**20
    assert max(calls) <= 256 * 2**10
    assert calls[-1] == 2**20 % 100_000  # the last step asks only for what the PDU has left


def test_a_guarded_pdu_body_is_read_in_large_steps(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, counted = pair
    guarded.requested = True  # associated: a P-DATA-TF up to data_bytes may be read
    body = bytes(range(256)) * 60  # 15 360 bytes, within the fixture's 16 KiB
    peer.sendall(_header(0x04, len(body)) + body)
    calls: list[int] = []
    real = GuardedSocket.recv

    def counting(self: GuardedSocket, bufsize: int, flags: int = 0) -> bytes:
        calls.append(bufsize)
        return real(self, bufsize, flags)

    association_socket = SimpleNamespace(socket=guarded)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GuardedSocket, "recv", counting)
        header = guard_module._association_recv(association_socket, 6)  # type: ignore[arg-type]
        read = guard_module._association_recv(association_socket, len(body))  # type: ignore[arg-type]
    assert bytes(header) == _header(0x04, len(body))
    assert bytes(read) == body
    assert len(calls) <= 3  # pynetdicom's own loop: 1 + 4 calls of 4096 bytes
    assert not counted


def test_a_guarded_read_cut_short_returns_what_came(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, _counted = pair
    guarded.requested = True
    peer.sendall(_header(0x04, 1000) + b"\1" * 100)
    peer.shutdown(socket.SHUT_WR)
    association_socket = SimpleNamespace(socket=guarded)
    guard_module._association_recv(association_socket, 6)  # type: ignore[arg-type]
    read = guard_module._association_recv(association_socket, 1000)  # type: ignore[arg-type]
    assert bytes(read) == b"\1" * 100


def test_the_receive_shortcuts_are_installed() -> None:
    guard_module.install_received_files()
    assert dimse_messages.create_file_meta is guard_module._create_file_meta  # type: ignore[attr-defined]
    assert dimse_messages.write_file_meta_info is guard_module._write_file_meta_info  # type: ignore[attr-defined]
    assert transport.AssociationSocket.recv is guard_module._association_recv
    receive = pynetdicom_dimse.DIMSEServiceProvider.receive_primitive
    assert receive is guard_module._receive_primitive  # type: ignore[comparison-overlap]


def test_the_reactor_pauses_end_when_what_they_wait_for_is_there(
    pair: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, _counted = pair
    guard_module.install_received_files()
    assert dul.time.sleep is guard_module._dul_sleep  # type: ignore[attr-defined]
    assert association.time.sleep is guard_module._association_sleep  # type: ignore[attr-defined]
    assert dul.time.monotonic is time.monotonic  # type: ignore[attr-defined]
    peer.sendall(b"\x04")  # data on the connection: the DUL's pause ends at once
    reactor = dul.DULServiceProvider.__new__(dul.DULServiceProvider)
    threading.Thread.__init__(reactor)
    reactor.socket = SimpleNamespace(socket=guarded)  # type: ignore[assignment]
    pauses: list[float] = []

    def pause(sleep: Any, seconds: float) -> None:
        start = time.perf_counter()
        sleep(seconds)
        pauses.append(time.perf_counter() - start)

    reactor.run = lambda: pause(guard_module._dul_sleep, 5.0)  # type: ignore[method-assign]
    reactor.start()
    reactor.join(10)
    assert pauses[-1] < 2.0
    # anywhere else it is time.sleep, as long as asked
    pause(guard_module._dul_sleep, 0.05)
    pause(guard_module._association_sleep, 0.05)
    assert min(pauses[-2:]) >= 0.05


def _p_data(*primitives: Any) -> list[tuple[int, bytes]]:
    """The PDVs (context 1) pynetdicom sends for these request primitives, in order."""
    values: list[tuple[int, bytes]] = []
    for primitive in primitives:
        message = (
            dimse_messages.N_CREATE_RQ()
            if isinstance(primitive, N_CREATE)
            else dimse_messages.C_ECHO_RQ()
        )
        message.primitive_to_message(primitive)
        for p_data in message.encode_msg(1, 16384):
            values += p_data.presentation_data_value_list
    return values


def test_a_request_whose_data_set_never_came_is_answered_and_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An N-CREATE-RQ with an empty data set (pynetdicom's client announces one and sends no
    fragment), then a C-ECHO-RQ whose command arrives in one P-DATA with nothing else: the
    N-CREATE is answered with Processing failure and cleared before the C-ECHO is decoded,
    on its own."""
    create = N_CREATE()
    create.MessageID = 7
    create.AffectedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    create.AffectedSOPInstanceUID = "1.2.3.4"
    create.AttributeList = BytesIO(b"")
    echo = C_ECHO()
    echo.MessageID = 8
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    open_request = dimse_messages.DIMSEMessage()
    for value in _p_data(create):
        single = P_DATA()
        single.presentation_data_value_list = []  # filled as pynetdicom's P_DATA_TF does
        single.presentation_data_value_list.append(value)
        assert not open_request.decode_msg(single)  # waits for the data set announced
    sent: list[tuple[Any, int]] = []
    decoded: list[tuple[Any, list[tuple[int, bytes]]]] = []
    provider = SimpleNamespace(message=open_request, dul=None)
    provider.send_msg = lambda answer, context_id: sent.append((answer, context_id))

    def receive(self: Any, primitive: P_DATA) -> None:
        decoded.append((self.message, list(primitive.presentation_data_value_list)))

    monkeypatch.setattr(guard_module, "_pynetdicom_receive_primitive", receive)
    both = P_DATA()
    both.presentation_data_value_list = []
    both.presentation_data_value_list.extend(_p_data(echo) * 2)
    guard_module._receive_primitive(provider, both)  # type: ignore[arg-type]
    ((answer, context_id),) = sent
    assert context_id == 1
    assert isinstance(answer, N_CREATE)
    assert answer.MessageIDBeingRespondedTo == 7
    assert answer.Status == 0x0110
    assert answer.AffectedSOPInstanceUID == "1.2.3.4"
    assert [message for message, _ in decoded] == [None, None]  # cleared before the next
    assert [len(values) for _, values in decoded] == [1, 1]  # one PDV at a time
