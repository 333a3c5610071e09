"""Fuzzing the Storage SCP through its DICOM port: mutated instances sent as C-STORE data sets
over real associations, mutated A-ASSOCIATE-RQ and P-DATA-TF PDUs on raw sockets, and mutated
MPPS N-CREATE / N-SET data sets.

After every example the node answers C-ECHO within a deadline (it neither crashed nor hangs), the
spool's ``.incoming`` is empty (no partial file), and the valid instances sent around the mutated
one in the same association were acknowledged. At the end every catalogued instance has its file
and every file its row. ``PACS_NODE_TEST_FUZZ_S`` bounds the run (seconds for the first two tests
together, 45 by default, and a fifth of it more for MPPS; ``make fuzz`` sets it large). No
shrinking: a failure prints the mutation that caused it.
"""

from __future__ import annotations

import copy
import os
import socket
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.association
import pynetdicom.dsutils
import pytest
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    Verification,
)

from pacs_node.dimse_client import parked
from tests.conftest import NodeProcess, wait_for
from tests.dicom_factory import CT_IMAGE, new_uid, write_series

pytestmark = pytest.mark.integration

FUZZ_S = float(os.environ.get("PACS_NODE_TEST_FUZZ_S", "45"))
ECHO_DEADLINE_S = 10.0
# The node's ACSE, DIMSE and network timeouts: a request it cannot decode may leave the
# connection open until one of them fires (an A-ASSOCIATE-RQ with an even presentation context
# ID kills pynetdicom's reactor thread for that connection), so "hangs" means longer than this.
NODE_TIMEOUT_S = 5
CALLING = "PACSNODE_SCU"
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
# Values a length field can take that parsers get wrong: zero, odd, undefined, huge, off by one.
MPPS = ModalityPerformedProcedureStep
LENGTHS = [0, 1, 2, 3, 0xFF, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 0x10000, 0x8000]
VRS = [b"OB", b"SQ", b"UN", b"UT", b"XX", b"\x00\x00", b"ob", b"OW", b"AT", b"FD", b"DS", b"UI"]
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV"}


def _settings(share: float) -> Callable[[Any], Any]:
    """Many examples; the time budget (checked in the test body) is what ends the run."""
    return settings(
        max_examples=max(20, int(FUZZ_S * share * 20)),
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


# Mutations: (kind, where, what); ``where`` is reduced modulo the size of what it points into.
Mutation = tuple[str, int, Any]
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31), st.none()),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 32)),
    st.tuples(st.just("int"), st.integers(0, 2**31), st.sampled_from(LENGTHS)),
    st.tuples(st.just("length"), st.integers(0, 2**31), st.sampled_from(LENGTHS)),
    st.tuples(st.just("vr"), st.integers(0, 2**31), st.sampled_from(VRS)),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def _element_headers(body: bytes) -> list[tuple[int, bool]]:
    """(offset, long length form) of each top-level element of an explicit VR LE data set."""
    headers: list[tuple[int, bool]] = []
    pos = 0
    while pos + 8 <= len(body):
        vr = body[pos + 4 : pos + 6]
        long_form = vr in _LONG_VRS
        if long_form:
            if pos + 12 > len(body):
                break
            length = struct.unpack_from("<I", body, pos + 8)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", body, pos + 6)[0]
            header = 8
        headers.append((pos, long_form))
        if length == 0xFFFFFFFF:
            break
        pos += header + length
    return headers


def _mutate(data: bytes, mutations: list[Mutation], headers: list[tuple[int, bool]]) -> bytes:
    out = bytearray(data)
    for kind, where, what in mutations:
        if not out:
            break
        at = where % len(out)
        if kind == "flip":
            out[at] ^= what
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = what
        elif kind == "delete":
            del out[at : at + what]
        elif kind == "int":
            out[at : at + 4] = struct.pack("<I", what)
        elif not headers and kind == "length":  # PDU and PDV lengths are big endian
            out[at : at + 4] = struct.pack(">I", what)
        elif not headers and kind == "vr":
            out[at : at + 2] = what
        elif kind in ("length", "vr"):
            offset, long_form = headers[where % len(headers)]
            if kind == "vr":
                out[offset + 4 : offset + 6] = what
            elif long_form:
                out[offset + 8 : offset + 12] = struct.pack("<I", what)
            else:
                out[offset + 6 : offset + 8] = struct.pack("<H", what & 0xFFFF)
    return bytes(out)


def _split_part10(path: Path) -> tuple[bytes, bytes]:
    """The preamble and file meta, and the data set after them."""
    raw = path.read_bytes()
    group_length = struct.unpack_from("<I", raw, 132 + 8)[0]
    end = 132 + 12 + group_length
    return raw[:end], raw[end:]


class Target:
    """One running node and what the fuzzing knows it acknowledged."""

    def __init__(self, node: NodeProcess, template: Dataset, work: Path) -> None:
        self.node = node
        self.template = template
        self.work = work
        self.acknowledged: set[str] = set()
        self.deadline = 0.0
        self.examples = 0
        self.statuses: dict[int, int] = {}
        self.ae = AE(ae_title=CALLING)
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            self.ae.add_requested_context(CT_IMAGE, syntax)
        self.ae.add_requested_context(Verification)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = ECHO_DEADLINE_S

    def instance(self, name: str, study_uid: str | None = None) -> tuple[Path, str]:
        """A valid instance written to ``name``; a new study when ``study_uid`` is None."""
        ds = copy.deepcopy(self.template)  # a shallow copy would share the template's elements
        if study_uid is None:
            ds.StudyInstanceUID = new_uid()
            ds.SeriesInstanceUID = new_uid()
        else:
            ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
        path = self.work / name
        ds.save_as(path, enforce_file_format=True)
        return path, str(ds.SOPInstanceUID)

    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    def healthy(self) -> None:
        """The node is up, answers C-ECHO within the deadline, and left no partial file."""
        process = self.node.process
        assert process is not None
        assert process.poll() is None, self.node.log_text()[-3000:]
        started = time.monotonic()
        assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title)
        assert assoc.is_established, "the node refused or ignored an association after fuzzing"
        status = parked(assoc).send_c_echo()
        assoc.release()
        assert status, "no C-ECHO response"
        assert int(status.Status) == 0, "C-ECHO failed"
        assert time.monotonic() - started < ECHO_DEADLINE_S
        incoming = self.node.data_dir / "spool" / ".incoming"
        wait_for(lambda: not list(incoming.rglob("*.part")), 10, what="an empty .incoming")

    def consistent(self) -> None:
        """Every acknowledged valid instance is stored once; every row has its file."""
        spool = self.node.data_dir / "spool"

        def check() -> bool:
            files = {p.stem for p in spool.rglob("*.dcm")}
            with sqlite3.connect(self.node.data_dir / "catalog.sqlite") as db:
                rows = dict(db.execute("select sop_instance_uid, path from instances").fetchall())
            return self.acknowledged <= set(rows) and set(rows) == files

        wait_for(check, 30, interval=0.5, what="the catalog to match the spool")
        with sqlite3.connect(self.node.data_dir / "catalog.sqlite") as db:
            paths = [row[0] for row in db.execute("select path from instances")]
        missing = [p for p in paths if not (spool / p).exists() and not Path(p).exists()]
        assert missing == []
        assert "SCP worker died" not in self.node.log_text()


@pytest.fixture
def target(make_node: Callable[..., NodeProcess], tmp_path: Path) -> Iterator[Target]:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the mutated bytes as they are
    node = make_node(
        dimse_timeout_s=NODE_TIMEOUT_S,
        network_timeout_s=NODE_TIMEOUT_S,
        acse_timeout_s=NODE_TIMEOUT_S,
    )
    (path,) = write_series(tmp_path / "template", slices=1, rows=8, columns=8)
    work = tmp_path / "work"
    work.mkdir()
    try:
        yield Target(node, pydicom.dcmread(path), work)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous  # the node's SCU sends files as stored


def test_mutated_instances_never_crash_or_hang_the_node(target: Target) -> None:
    target.deadline = time.monotonic() + FUZZ_S * 0.55
    study_uid = new_uid()

    @_settings(0.55)
    @given(mutations=MUTATIONS)
    def run(mutations: list[Mutation]) -> None:
        if target.spent():
            return
        target.examples += 1
        note(f"mutations: {mutations!r}")
        good_a, uid_a = target.instance("a.dcm", study_uid)
        good_b, uid_b = target.instance("b.dcm", study_uid)
        source, _ = target.instance("m.dcm")  # a study of its own: no identity conflict
        meta, body = _split_part10(source)
        mutated = target.work / "mutated.dcm"
        mutated.write_bytes(meta + _mutate(body, mutations, _element_headers(body)))

        assoc = target.ae.associate("127.0.0.1", target.node.port, ae_title=target.node.ae_title)
        assert assoc.is_established
        statuses = []
        for path in (good_a, mutated, good_b):
            status = parked(assoc).send_c_store(path)
            statuses.append(int(status.Status) if status and "Status" in status else None)
        if assoc.is_established:
            assoc.release()
        note(f"statuses: {statuses}")
        answer = -1 if statuses[1] is None else statuses[1]  # -1: no answer
        target.statuses[answer] = target.statuses.get(answer, 0) + 1
        assert statuses[0] == 0, "the valid instance before it failed"
        assert statuses[2] == 0, "the valid instance after it failed"
        target.acknowledged |= {uid_a, uid_b}
        target.healthy()

    run()
    target.consistent()
    assert target.examples >= 5
    seen = {("none" if k < 0 else f"0x{k:04X}"): n for k, n in sorted(target.statuses.items())}
    print(f"{target.examples} mutated instances; statuses of the mutated one: {seen}")


# Raw PDUs ------------------------------------------------------------------------------------


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _associate_rq(called: str, calling: str) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2): CT Image Storage and Verification, explicit VR LE."""
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract in ((1, CT_IMAGE), (3, Verification)):
        sub = _item(0x30, abstract.encode())
        sub += _item(0x40, ExplicitVRLittleEndian.encode())
        items += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.10.1234.9")
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _accepted_syntax(ac: bytes) -> str | None:
    """The transfer syntax accepted for presentation context 1 in an A-ASSOCIATE-AC."""
    if len(ac) < 74 or ac[0] != 0x02:
        return None
    pos = 74
    while pos + 4 <= len(ac):
        kind, length = ac[pos], struct.unpack_from(">H", ac, pos + 2)[0]
        payload = ac[pos + 4 : pos + 4 + length]
        if kind == 0x21 and payload[0] == 1 and payload[2] == 0:
            return payload[8:].decode().rstrip("\0 ")
        pos += 4 + length
    return None


def _c_store_pdus(
    path: Path, message_id: int, sop_class_uid: str | None = None, body: bytes | None = None
) -> bytes:
    """The P-DATA-TF PDUs of one C-STORE-RQ of ``path`` (explicit VR LE) on context 1;
    ``sop_class_uid``: the Affected SOP Class UID sent instead of the data set's (an empty one
    is sent as an element of zero length); ``body``: the data set sent instead of the file's."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = BytesIO(_split_part10(path)[1] if body is None else body)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    if sop_class_uid is not None:
        message.command_set.AffectedSOPClassUID = sop_class_uid
    raw = b""
    for p_data in message.encode_msg(1, 4096):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        raw += pdu.encode()
    return raw


def _store_statuses(stream: bytes) -> dict[int, int]:
    """Message ID -> status of the C-STORE-RSPs in what the node sent back."""
    statuses: dict[int, int] = {}
    command = b""
    pos = 0
    while pos + 6 <= len(stream):
        kind, length = stream[pos], struct.unpack_from(">I", stream, pos + 2)[0]
        pdu = stream[pos + 6 : pos + 6 + length]
        pos += 6 + length
        if kind != 0x04:
            continue
        item = 0
        while item + 6 <= len(pdu):
            item_length = struct.unpack_from(">I", pdu, item)[0]
            header, fragment = pdu[item + 5], pdu[item + 6 : item + 4 + item_length]
            item += 4 + item_length
            if not header & 0x01:
                continue
            command += fragment
            if header & 0x02:
                parsed = pydicom.dcmread(BytesIO(command), force=True)
                statuses[int(parsed.MessageIDBeingRespondedTo)] = int(parsed.Status)
                command = b""
    return statuses


def _answers(sock: socket.socket, chunks: tuple[bytes, ...]) -> bytes:
    """Send ``chunks``; read until the node ends the association (release, abort or close).

    EOF is sent only after ``ANSWER_WAIT_S`` without an end (a mutated length can leave the
    node waiting for bytes that never come): an early EOF would abort what is still answered.
    """
    received = b""
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except OSError:  # the node closed first: fine, it owes us nothing
            break
    sock.settimeout(ANSWER_WAIT_S)
    eof_sent = False
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        except TimeoutError as exc:
            if eof_sent:
                raise AssertionError("the node kept the connection open after EOF") from exc
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(NODE_TIMEOUT_S + ECHO_DEADLINE_S)
            eof_sent = True
            continue
        if not data:
            break
        received += data
        if _ended(received):
            break
    return received


def _answered(
    sock: socket.socket, requests: bytes, message_ids: set[int], release: bool = True
) -> bytes:
    """Send ``requests``, read until the C-STORE-RSPs to ``message_ids`` came, then release.

    The A-RELEASE-RQ waits for them: pynetdicom's acceptor takes one queued request per turn
    and releases at the first turn that finds the A-RELEASE-RQ, answering none still queued.
    """
    sock.sendall(requests)
    received = b""
    sock.settimeout(NODE_TIMEOUT_S + ECHO_DEADLINE_S)
    while not message_ids <= set(_store_statuses(received)) and not _ended(received):
        data = sock.recv(65536)
        assert data, f"the node closed after answering {_store_statuses(received)}"
        received += data
    return received + _answers(sock, (RELEASE_RQ,)) if release else received


def _ended(stream: bytes) -> bool:
    """Whether ``stream`` holds an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT."""
    pos = 0
    while pos + 6 <= len(stream):
        if stream[pos] in (0x03, 0x06, 0x07):
            return True
        pos += 6 + struct.unpack_from(">I", stream, pos + 2)[0]
    return False


def _associated(port: int, called: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=ECHO_DEADLINE_S)
    sock.sendall(_associate_rq(called, CALLING))
    ac = b""
    while len(ac) < 6 or len(ac) < 6 + struct.unpack_from(">I", ac, 2)[0]:
        data = sock.recv(65536)
        assert data, "the node closed instead of answering a valid A-ASSOCIATE-RQ"
        ac += data
    assert _accepted_syntax(ac) == ExplicitVRLittleEndian, f"context 1 refused: {ac[:8]!r}"
    return sock


GOOD_ID = 777  # far from the mutated message's ID 1
ANSWER_WAIT_S = 1.0
RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def test_mutated_pdus_never_crash_or_hang_the_node(target: Target) -> None:
    target.deadline = time.monotonic() + FUZZ_S * 0.45
    called = target.node.ae_title
    valid_rq = _associate_rq(called, CALLING)
    study_uid = new_uid()

    @_settings(0.45)
    @given(which=st.sampled_from(["associate", "p-data"]), mutations=MUTATIONS)
    @example(which="associate", mutations=[("vr", 103, b"FD")])  # an even context ID
    def run(which: str, mutations: list[Mutation]) -> None:
        if target.spent():
            return
        target.examples += 1
        note(f"{which} mutations: {mutations!r}")
        if which == "associate":
            with socket.create_connection(("127.0.0.1", target.node.port), timeout=5) as sock:
                _answers(sock, (_mutate(valid_rq, mutations, []), RELEASE_RQ))
            target.healthy()
            return
        source, _ = target.instance("m.dcm")
        good, uid = target.instance("b.dcm", study_uid)
        mutated = _mutate(_c_store_pdus(source, 1), mutations, [])
        sock = _associated(target.node.port, called)
        with sock:
            received = _answers(sock, (mutated, _c_store_pdus(good, GOOD_ID), RELEASE_RQ))
        statuses = _store_statuses(received)
        note(f"statuses: {statuses}")
        if statuses.get(GOOD_ID) in SUCCESS_OR_WARNING:
            target.acknowledged.add(uid)  # acknowledged: it must be stored
        target.healthy()

    run()
    # and after all that, a valid C-STORE on a raw association is stored
    good, uid = target.instance("last.dcm", study_uid)
    with _associated(target.node.port, called) as sock:
        received = _answers(sock, (_c_store_pdus(good, GOOD_ID), RELEASE_RQ))
    assert _store_statuses(received) == {GOOD_ID: 0}
    target.acknowledged.add(uid)
    target.consistent()
    assert target.examples >= 5
    print(f"{target.examples} mutated PDUs; {len(target.acknowledged)} valid ones acknowledged")


# Modality Performed Procedure Step --------------------------------------------------------


def _step(study_uid: str, listed: int) -> Dataset:
    """A valid MPPS data set (N-CREATE attributes, which also serve as an N-SET's list with
    the fields an N-SET may not carry left out)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = [scheduled]
    series = Dataset()
    series.SeriesInstanceUID = study_uid + ".1"
    series.ReferencedImageSequence = []
    for n in range(1, listed + 1):
        ref = Dataset()
        ref.ReferencedSOPClassUID = CT_IMAGE
        ref.ReferencedSOPInstanceUID = f"{study_uid}.1.{n}"
        series.ReferencedImageSequence.append(ref)
    ds.PerformedSeriesSequence = [series]
    return ds


def test_mutated_mpps_requests_never_crash_or_hang_the_node(
    make_node: Callable[..., NodeProcess],
) -> None:
    """Mutated N-CREATE Attribute Lists and N-SET Modification Lists: the node neither crashes
    nor hangs, and a valid N-CREATE and N-SET on the next association are recorded."""
    node = make_node(
        mpps=True,
        dimse_timeout_s=NODE_TIMEOUT_S,
        network_timeout_s=NODE_TIMEOUT_S,
        acse_timeout_s=NODE_TIMEOUT_S,
    )
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(ModalityPerformedProcedureStep, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_DEADLINE_S
    study_uid = f"2.25.{uuid.uuid4().int % 10**30}"  # room for the listed instances' suffixes
    create = _step(study_uid, 3)
    update = _step(study_uid, 3)
    del update.ScheduledStepAttributesSequence
    update.PerformedProcedureStepStatus = "COMPLETED"
    bodies = {
        which: pynetdicom.dsutils.encode(ds, False, True)
        for which, ds in (("create", create), ("set", update))
    }
    seen: dict[str, int] = {}
    deadline = time.monotonic() + max(5.0, FUZZ_S * 0.2)
    examples = 0

    def associate() -> Any:
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, "the node refused an association after fuzzing"
        return assoc

    @_settings(0.2)
    @given(which=st.sampled_from(["create", "set"]), mutations=MUTATIONS)
    def run(which: str, mutations: list[Mutation]) -> None:
        nonlocal examples
        if time.monotonic() > deadline:
            return
        examples += 1
        note(f"{which} mutations: {mutations!r}")
        body = bodies[which]
        mutated = _mutate(body, mutations, _element_headers(body))
        uid = new_uid()
        assoc = associate()
        if which == "set":
            assert int(parked(assoc).send_n_create(create, MPPS, uid)[0].Status) == 0
        original = pynetdicom.association.encode
        pynetdicom.association.encode = lambda *_args: mutated  # sent as they are
        try:
            if which == "create":
                reply, _ = parked(assoc).send_n_create(create, MPPS, uid)
            else:
                reply, _ = parked(assoc).send_n_set(update, MPPS, uid)
        finally:
            pynetdicom.association.encode = original
        status = int(reply.Status) if "Status" in reply else -1
        note(f"status: 0x{status:04X}")
        seen[f"{which} 0x{status:04X}"] = seen.get(f"{which} 0x{status:04X}", 0) + 1
        if assoc.is_established:  # a data set cut to nothing may leave its message open
            assoc.abort()
        assoc = associate()
        good = new_uid()
        assert int(parked(assoc).send_n_create(create, MPPS, good)[0].Status) == 0
        assert int(parked(assoc).send_n_set(update, MPPS, good)[0].Status) == 0
        assert int(parked(assoc).send_c_echo().Status) == 0
        assoc.release()
        assert node.process is not None
        assert node.process.poll() is None, node.log_text()[-3000:]

    run()
    assert examples >= 5
    assert "SCP worker died" not in node.log_text()
    print(f"{examples} mutated MPPS requests; answers: {dict(sorted(seen.items()))}")


def test_a_c_store_without_its_sop_class_uid_is_not_kept_and_the_association_goes_on(
    target: Target,
) -> None:
    """A C-STORE-RQ whose Affected SOP Class UID is empty is never stored (nor written with
    "None" or "" in its header) and does not end the association: the next C-STORE on the
    same association is stored."""
    called = target.node.ae_title
    study_uid = new_uid()
    empty, empty_uid = target.instance("empty.dcm", study_uid)
    good, uid = target.instance("good.dcm", study_uid)
    pdus = _c_store_pdus(empty, 1, sop_class_uid="")
    with _associated(target.node.port, called) as sock:
        received = _answered(sock, pdus + _c_store_pdus(good, GOOD_ID), {GOOD_ID})
    statuses = _store_statuses(received)
    assert statuses[GOOD_ID] == 0
    # pynetdicom finds no service for it and leaves it unanswered; never a success
    assert statuses.get(1) not in SUCCESS_OR_WARNING
    target.acknowledged.add(uid)
    target.healthy()
    target.consistent()
    spool = target.node.data_dir / "spool"
    assert not [p for p in spool.rglob("*.dcm") if p.stem == empty_uid]


def _late_reactor(assoc: Any, delay_s: float) -> None:
    """Make ``assoc``'s reactor thread, each time its checkpoint lets it go, run on only once
    an answer is queued (or ``delay_s`` passed): a thread the scheduler runs late, at the worst
    moment, every time, so the race :func:`parked` closes happens on every request."""
    checkpoint = assoc._reactor_checkpoint
    wait = checkpoint.wait

    def late_wait(timeout: float | None = None) -> bool:
        woken = wait(timeout)
        end = time.monotonic() + delay_s
        while not assoc.dimse.msg_queue.queue and time.monotonic() < end:
            pass
        return woken

    checkpoint.wait = late_wait


def test_the_instance_after_a_refused_one_is_answered_on_the_same_association(
    target: Target,
) -> None:
    """The fuzzing's sequence that once lost the third answer (mutation ``length 0 0``: the
    first element's length set to zero, so the data set cannot be read): a valid instance, the
    mutated one (refused) and a valid one on one association, with the client's reactor
    thread resuming late. Each request is answered: the node answers the third, and
    :func:`parked` keeps the client's reactor from taking that answer for itself (with a bare
    ``send_c_store`` the answers after the first are lost here every time)."""
    study_uid = new_uid()
    for _ in range(3):
        good_a, uid_a = target.instance("a.dcm", study_uid)
        good_b, uid_b = target.instance("b.dcm", study_uid)
        source, _ = target.instance("m.dcm")
        meta, body = _split_part10(source)
        mutated = target.work / "mutated.dcm"
        mutated.write_bytes(meta + _mutate(body, [("length", 0, 0)], _element_headers(body)))
        assoc = target.ae.associate("127.0.0.1", target.node.port, ae_title=target.node.ae_title)
        assert assoc.is_established
        _late_reactor(assoc, 0.5)
        statuses = []
        for path in (good_a, mutated, good_b):
            status = parked(assoc).send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else None)
        assoc.release()
        assert statuses[0] == 0, statuses
        assert statuses[2] == 0, statuses
        assert statuses[1] is not None
        assert statuses[1] not in SUCCESS_OR_WARNING
        target.acknowledged |= {uid_a, uid_b}
    target.healthy()
    target.consistent()


def _pdv_pdu(control: int, payload: bytes) -> bytes:
    """A P-DATA-TF of one PDV on context 1 (PS3.8 9.3.5, E.2)."""
    item = struct.pack(">IBB", len(payload) + 2, 1, control) + payload
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _command_only(pdus: bytes) -> bytes:
    """The PDUs of a request cut after its command set (each PDU holds one PDV here)."""
    out, pos = b"", 0
    while pos < len(pdus):
        end = pos + 6 + struct.unpack_from(">I", pdus, pos + 2)[0]
        if pdus[pos + 11] & 0x01:
            out += pdus[pos:end]
        pos = end
    return out


@pytest.mark.parametrize(
    "data_set",
    ["absent", "absent, answer awaited", "empty last fragment", "first element length 0"],
)
def test_a_request_with_a_missing_or_empty_data_set_is_refused_and_the_next_answered(
    target: Target, data_set: str
) -> None:
    """A C-STORE-RQ announcing a data set, followed by nothing but the next request's command
    (pynetdicom's client sends an empty data set so), by nothing while the client waits for
    its answer, by a last fragment of zero bytes, or by a data set that cannot be read, between
    two valid ones: each of the three is answered, the bad one with a failure (a waiting client
    within the node's timeouts), and only the valid ones are stored."""
    study_uid = new_uid()
    for _ in range(3):
        good_a, uid_a = target.instance("a.dcm", study_uid)
        good_b, uid_b = target.instance("b.dcm", study_uid)
        bad, bad_uid = target.instance("m.dcm")
        if data_set.startswith("absent"):
            middle = _command_only(_c_store_pdus(bad, 5))
        elif data_set == "empty last fragment":
            middle = _command_only(_c_store_pdus(bad, 5)) + _pdv_pdu(0x02, b"")
        else:
            body = _split_part10(bad)[1]
            middle = _c_store_pdus(bad, 5, body=_mutate(body, [("length", 0, 0)], [(0, False)]))
        with _associated(target.node.port, target.node.ae_title) as sock:
            received, requests, awaited = b"", _c_store_pdus(good_a, 3) + middle, {3, 5}
            if data_set == "absent, answer awaited":  # nothing more is sent until it is answered
                started = time.monotonic()
                received = _answered(sock, requests, awaited, release=False)
                assert time.monotonic() - started < NODE_TIMEOUT_S
                requests, awaited = b"", set()
            requests += _c_store_pdus(good_b, GOOD_ID)
            received += _answered(sock, requests, awaited | {GOOD_ID})
        statuses = _store_statuses(received)
        assert statuses[3] == 0
        assert statuses[GOOD_ID] == 0
        assert statuses[5] not in SUCCESS_OR_WARNING
        target.acknowledged |= {uid_a, uid_b}
        spool = target.node.data_dir / "spool"
        assert not [p for p in spool.rglob("*.dcm") if p.stem == bad_uid]
    target.healthy()
    target.consistent()
