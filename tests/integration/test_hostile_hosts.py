"""Hostile hosts before and during an association, through real sockets against a running node:
idle connections, oversized and stalled PDUs, deflate bombs, oversized instances, and the
association limits; the node's memory measured from /proc."""

from __future__ import annotations

import socket
import sqlite3
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from pacs_node.ingest.part10 import file_meta
from tests.conftest import STORESCU, NodeProcess, storescu, wait_for
from tests.dicom_factory import new_uid, write_series

pytestmark = pytest.mark.integration

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MIB = 2**20
ECHOSCU = "/usr/bin/echoscu"


def _counter(node: NodeProcess, name: str) -> int:
    with sqlite3.connect(node.data_dir / "catalog.sqlite") as db:
        row = db.execute("select value from counters where name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _processes(node: NodeProcess) -> list[int]:
    """The main process and its SCP workers."""
    assert node.process is not None
    children = subprocess.run(
        ["pgrep", "-P", str(node.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    pids = [node.process.pid]
    for pid in map(int, children):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "pacs-node-scp":
                pids.append(pid)
        except FileNotFoundError:
            continue
    return pids


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of ``pid``, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


@contextmanager
def _memory_bounded(node: NodeProcess, bound: int) -> Iterator[None]:
    """Assert that no process of the node peaks more than ``bound`` bytes above its start."""
    pids = wait_for(lambda: len(p := _processes(node)) >= 3 and p, 30, what="SCP workers")
    before = {pid: _memory(pid) for pid in pids}
    yield
    for pid in pids:
        after = _memory(pid)
        grown = after["VmHWM"] - before[pid]["VmHWM"]
        print(f"pid {pid}: VmHWM +{grown / MIB:.1f} MiB, VmRSS {after['VmRSS'] / MIB:.0f} MiB")
        assert grown < bound, f"pid {pid} peaked {grown / MIB:.0f} MiB higher: {after}"


def _hostile(node: NodeProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", node.port))
    return sock


def _closed_by_peer(sock: socket.socket, within: float) -> float:
    """Seconds until the node closes ``sock`` (reading whatever it answered)."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def _serving(node: NodeProcess) -> None:
    """Wait until the SCP workers answer (they take a while to start on a busy machine)."""
    wait_for(
        lambda: (
            subprocess.run(
                [
                    "/usr/bin/echoscu",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    node.ae_title,
                    "127.0.0.1",
                    str(node.port),
                ],
                capture_output=True,
                timeout=60,
                check=False,
            ).returncode
            == 0
        ),
        90,
        what="C-ECHO",
    )


def test_idle_connections_do_not_lock_out_a_scanner(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    # A long request timeout: the scanner must get in because idle connections make room,
    # not because they timed out.
    node = make_node(assoc_request_timeout_s=30.0, dicom_workers=2)
    files = write_series(tmp_path / "ct", slices=2)
    _serving(node)
    idle = [_hostile(node) for _ in range(100)]
    idle += [_hostile(node, "127.0.0.2") for _ in range(20)]
    try:
        start = time.monotonic()
        result = storescu(node, *files)
        elapsed = time.monotonic() - start
        print(f"storescu behind 120 idle connections: {elapsed:.2f} s")
        assert result.returncode == 0, result.stderr
        assert elapsed < 10, f"storescu took {elapsed:.1f} s"  # the request timeout is 30 s
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: [s["instances"] for s in node.studies()] == [2], 30, what="both stored")
    # at most 16 pending per address in each of the two workers: the others made room
    wait_for(
        lambda: _counter(node, "idle_connections_closed") >= 100 - 2 * 16, 10, what="the counter"
    )


def test_a_connection_without_a_request_is_closed_in_time(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(assoc_request_timeout_s=1.5, dicom_workers=2)
    _serving(node)
    silent = _hostile(node)
    partial = _hostile(node)
    partial.sendall(struct.pack(">BBL", 0x01, 0, 1000) + b"\x00" * 100)  # then a stall
    assert _closed_by_peer(silent, within=10) < 4
    assert _closed_by_peer(partial, within=10) < 4
    wait_for(lambda: _counter(node, "idle_connections_closed") >= 2, 10, what="the counter")


def test_an_oversized_association_request_is_refused_unread(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(dicom_workers=2)
    _serving(node)
    with _memory_bounded(node, 48 * MIB):
        for declared in (256 * MIB, 2**31):
            sock = _hostile(node)
            sock.settimeout(10)
            sent = 0
            answer = b""
            try:
                sock.sendall(struct.pack(">BBL", 0x01, 0, declared))
                chunk = b"\x00" * MIB
                while sent < 256 * MIB:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            with suppress(ConnectionResetError):
                answer = sock.recv(10)
            sock.close()
            assert sent < 64 * MIB, f"the node read {sent / MIB:.0f} MiB of a refused request"
            if answer:  # A-ASSOCIATE-RJ permanent, service provider, local-limit-exceeded
                assert answer == bytes.fromhex("03000000000400010302")
    wait_for(lambda: _counter(node, "oversized_pdus") == 2, 10, what="the counter")
    assert storescu(node, *write_series(tmp_path / "ct", slices=1)).returncode == 0


def _associate(node: NodeProcess, *syntaxes: str, calling: str = "STORESCU") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(SECONDARY_CAPTURE, list(syntaxes) or [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def test_oversized_and_stalled_pdus_inside_an_association_are_dropped(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(network_timeout_s=2.0, dicom_workers=2)
    _serving(node)
    with _memory_bounded(node, 48 * MIB):
        huge: object = _associate(node)
        assert getattr(huge, "is_established", False)
        raw = huge.dul.socket.socket  # type: ignore[attr-defined]
        raw.sendall(struct.pack(">BBL", 0x04, 0, 2**31 - 1))  # P-DATA-TF of 2 GiB, then nothing
        wait_for(lambda: huge.is_aborted, 10, what="the node to abort")  # type: ignore[attr-defined]

        stalled: object = _associate(node)
        raw = stalled.dul.socket.socket  # type: ignore[attr-defined]
        start = time.monotonic()
        raw.sendall(struct.pack(">BBL", 0x04, 0, 10_000) + b"\x00" * 100)  # then a stall
        wait_for(lambda: stalled.is_aborted, 15, what="the stall to end")  # type: ignore[attr-defined]
        assert time.monotonic() - start < 8
    wait_for(lambda: _counter(node, "oversized_pdus") == 1, 10, what="oversized counter")
    wait_for(lambda: _counter(node, "stalled_reads") == 1, 10, what="stall counter")


def _encoded(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _identifiers(sop_uid: str, study_uid: str) -> tuple[Dataset, Dataset]:
    """The data set's leading elements (group 0008) and the rest of its identifiers."""
    head = Dataset()
    head.SOPClassUID = SECONDARY_CAPTURE
    head.SOPInstanceUID = sop_uid
    head.Modality = "OT"
    tail = Dataset()
    tail.PatientID = "BOMB-1"
    tail.StudyInstanceUID = study_uid
    tail.SeriesInstanceUID = new_uid()
    return head, tail


def _write_deflated(path: Path, study_uid: str, bomb_bytes: int = 0) -> str:
    """A Deflated Explicit VR Little Endian Part 10 file; ``bomb_bytes`` of zeros in a private
    element of group 0009, which the node's header reader must cross."""
    sop_uid = new_uid()
    head, tail = _identifiers(sop_uid, study_uid)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as handle:
        handle.write(file_meta(SECONDARY_CAPTURE, sop_uid, DeflatedExplicitVRLittleEndian, "T"))
        handle.write(compressor.compress(_encoded(head)))
        if bomb_bytes:
            creator = Dataset()
            creator.add_new(0x00090010, "LO", "BOMB")
            handle.write(compressor.compress(_encoded(creator)))
            element = struct.pack("<HH2sHI", 9, 0x1010, b"OB", 0, bomb_bytes)
            handle.write(compressor.compress(element))
            zeros = b"\x00" * (4 * MIB)
            for _ in range(bomb_bytes // len(zeros)):
                handle.write(compressor.compress(zeros))
        handle.write(compressor.compress(_encoded(tail)))
        handle.write(compressor.flush())
    return sop_uid


def test_a_deflate_bomb_fails_and_a_valid_instance_goes_on(
    make_node: Callable[..., NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(dicom_workers=2)
    _serving(node)
    study_uid = new_uid()
    bomb = tmp_path / "bomb.dcm"
    _write_deflated(bomb, study_uid, bomb_bytes=400 * MIB)
    assert bomb.stat().st_size < MIB
    valid = tmp_path / "valid.dcm"
    valid_uid = _write_deflated(valid, study_uid)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    with _memory_bounded(node, 96 * MIB):
        assoc: object = _associate(node, DeflatedExplicitVRLittleEndian)
        assert getattr(assoc, "is_established", False)
        refused = assoc.send_c_store(bomb)  # type: ignore[attr-defined]
        stored = assoc.send_c_store(valid)  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    assert refused.Status == 0xA700
    assert stored.Status == 0x0000
    spooled = list((node.data_dir / "spool").rglob("*.dcm"))
    assert [p.name for p in spooled] == [f"{valid_uid}.dcm"]
    assert list((node.data_dir / "spool" / ".incoming").rglob("*.part")) == []
    wait_for(lambda: _counter(node, "failed_instances") == 1, 10, what="failure counter")


def test_an_instance_over_max_instance_mb_is_refused_and_the_association_goes_on(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(max_instance_mb=1, dicom_workers=2)
    _serving(node)
    big, small = Dataset(), Dataset()
    for ds in (big, small):
        head, tail = _identifiers(new_uid(), new_uid())
        ds.update(head)
        ds.update(tail)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    big.add_new(0x00291010, "OB", b"\x01" * (3 * MIB))  # after the identifiers
    with _memory_bounded(node, 48 * MIB):
        assoc: object = _associate(node)
        statuses = [assoc.send_c_store(ds).Status for ds in (big, small)]  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    assert statuses == [0xA700, 0x0000]
    spooled = [p.name for p in (node.data_dir / "spool").rglob("*.dcm")]
    assert spooled == [f"{small.SOPInstanceUID}.dcm"]
    assert list((node.data_dir / "spool" / ".incoming").rglob("*.part")) == []
    assert "max_instance_mb" in node.log_text()


def test_association_limits_refuse_with_local_limit_exceeded_and_count(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(
        max_associations=3,
        max_associations_per_peer=2,
        dicom_workers=2,
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "CT1"}, {"ae_title": "CT2"}],
    )
    _serving(node)
    held = [_associate(node, calling="CT1") for _ in range(2)]
    assert all(getattr(a, "is_established", False) for a in held)
    per_peer: object = _associate(node, calling="CT1")
    assert getattr(per_peer, "is_rejected", False)
    held.append(_associate(node, calling="CT2"))
    assert getattr(held[-1], "is_established", False)
    in_total: object = _associate(node, calling="CT2")
    assert getattr(in_total, "is_rejected", False)
    for refused in (per_peer, in_total):
        rejection = refused.acceptor.primitive  # type: ignore[attr-defined]
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    for assoc in held:
        assoc.release()  # type: ignore[attr-defined]
    wait_for(lambda: _counter(node, "local_limit_refusals") == 2, 10, what="the counter")
    assert "association refused: local limit reached" in node.log_text()
    again: object = wait_for(
        lambda: getattr(a := _associate(node, calling="CT1"), "is_established", False) and a,
        10,
        what="room again once released",
    )
    again.release()  # type: ignore[attr-defined]


def test_eight_storescu_at_once_all_succeed(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(dicom_workers=2)
    study_uid = new_uid()
    folders = []
    for i in range(8):
        write_series(tmp_path / f"s{i}", slices=15, study_uid=study_uid, series_number=i + 1)
        folders.append(tmp_path / f"s{i}")
    address = ["127.0.0.1", str(node.port)]
    senders = [
        subprocess.Popen(
            [STORESCU, "-aet", "STORESCU", "-aec", node.ae_title, "+sd", *address, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for folder in folders
    ]
    for sender in senders:
        output, _ = sender.communicate(timeout=240)
        assert sender.returncode == 0, output
    wait_for(lambda: [s["instances"] for s in node.studies()] == [120], 60, what="all 120")
    assert _counter(node, "local_limit_refusals") == 0
