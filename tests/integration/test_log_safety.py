"""What a hostile peer can do to the node's log through a real association: no forged lines,
a few lines per malformed request, and a flood of them rate-limited."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable

import pytest

from tests.conftest import NodeProcess, wait_for

pytestmark = pytest.mark.integration

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T")


def _item(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0]) + struct.pack(">H", len(payload)) + payload


def associate_rq(calling: bytes, called: bytes = b"PACSNODE") -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) offering Verification, with raw AE title bytes."""
    context = (
        b"\x01\x00\x00\x00" + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2")
    )
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.1")
    body = (
        b"\x00\x01\x00\x00"
        + called.ljust(16)[:16]
        + calling.ljust(16)[:16]
        + b"\x00" * 32
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return b"\x01\x00" + struct.pack(">I", len(body)) + body


def send_raw(node: NodeProcess, pdu: bytes) -> bytes:
    """Send one PDU and read what comes back until the node answers or closes."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(pdu)
        try:
            return sock.recv(1024)
        except (TimeoutError, ConnectionResetError):
            return b""


def test_a_forged_ae_title_never_starts_a_log_line(make_node: Callable[..., NodeProcess]) -> None:
    node = make_node()
    wait_for(lambda: "node started" in node.log_text(), 30, what="the node's start line")
    before = len(node.log_text().splitlines())
    answer = send_raw(node, associate_rq(b"A\r\nFAKE", called=b"\nFAKE2 INFO"))
    assert answer[:1] != b"\x02"  # rejected, aborted or closed: never accepted
    wait_for(lambda: "AE Title" in node.log_text(), 15, what="the node's error line")
    lines = node.log_text().splitlines()
    assert not [line for line in lines if line.startswith("FAKE")]
    new = lines[before:]
    assert all(_TIMESTAMP.match(line) for line in new), new  # every line is a whole record
    errors = [line for line in new if " ERROR " in line or " WARNING " in line]
    assert 1 <= len(errors) <= 4, new  # was 20 lines with pynetdicom's traceback
    assert any("\\nFAKE" in line for line in new)


def test_a_flood_of_malformed_requests_is_rate_limited(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(dicom_workers=0, log_repeat_limit=3, log_repeat_window_s=600.0)
    flood = 25
    for _ in range(flood):
        assert send_raw(node, associate_rq(b"A\r\nFAKE"))[:1] != b"\x02"  # never accepted
    wait_for(
        lambda: node.log_text().count("Unable to decode the received PDU data") >= 3,
        15,
        what="error lines",
    )
    assert send_raw(node, associate_rq(b"STORESCU"))[:1] == b"\x02"  # still serves
    node.stop()  # the handler writes what it still holds back when the node exits
    lines = node.log_text().splitlines()
    errors = [line for line in lines if " ERROR pynetdicom" in line]
    assert len(errors) == 3 * 3, errors  # three messages per request, each three times
    summaries = [line for line in lines if "suppressed" in line]
    assert len(summaries) == 3, summaries
    for line in summaries:
        assert f"suppressed {flood - 3} similar" in line
        assert "logger=pynetdicom." in line
    assert not [line for line in lines if line.startswith("FAKE")]
