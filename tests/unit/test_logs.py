"""The node's log handler: one record one line (control characters escaped, library records
included), repeats rate-limited, and no HTTP client logging request URLs at INFO."""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacs_node.logs import (
    QUIET_LIBRARIES,
    JsonFormatter,
    NodeHandler,
    RepeatLimiter,
    TextFormatter,
    configure_logging,
    escape,
)
from tests.conftest import free_port


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def _record(
    msg: str, *args: object, name: str = "pacs_node.x", level: int = logging.ERROR
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


def _exc_record(name: str, message: str) -> logging.LogRecord:
    try:
        raise ValueError(message)
    except ValueError:
        import sys

        record = logging.LogRecord(name, logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    return record


def _lines(text: str) -> list[str]:
    return text.split("\n")


@given(st.text(max_size=40))
def test_escape_leaves_no_control_character(value: str) -> None:
    out = escape(value)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in out)
    assert escape(value.replace("\\", "")) == escape(value.replace("\\", ""))


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_a_forged_value_stays_on_its_line(formatter: logging.Formatter) -> None:
    forged = "A\r\nFAKE 2026 INFO pacs_node ok\x1b[2J\x85\u2028X\x7f"
    record = _record("Invalid value %r", forged, name="pynetdicom.utils")
    record.calling_ae = forged
    text = formatter.format(record)
    assert len(_lines(text)) == 1
    assert "\r" not in text
    assert "\x1b" not in text
    assert "\x85" not in text
    assert "\x7f" not in text
    assert "\u2028" not in text
    if isinstance(formatter, JsonFormatter):
        entry = json.loads(text)
        assert "\\r\\nFAKE" in entry["msg"]
        assert "\\r\\nFAKE" in entry["calling_ae"]
    else:
        assert "\\r\\nFAKE" in text


def test_tracebacks_are_indented_and_library_ones_shortened() -> None:
    own = TextFormatter().format(_exc_record("pacs_node.worker", "bad\nFAKE line"))
    rows = _lines(own)
    assert len(rows) > 2
    assert all(row.startswith("    ") for row in rows[1:])
    assert not any(row.startswith("FAKE") for row in rows)
    library = TextFormatter().format(_exc_record("pynetdicom.dul", "bad\nFAKE line"))
    assert len(_lines(library)) == 1
    assert 'exc="ValueError (test_logs.py:' in library
    full = TextFormatter(full_library_tracebacks=True).format(_exc_record("pynetdicom.dul", "x"))
    assert "Traceback" in full
    entry = json.loads(JsonFormatter().format(_exc_record("pacs_node.worker", "a\rb")))
    assert "Traceback" in entry["exc"]
    assert "\r" not in entry["exc"]


def test_repeats_are_limited_then_summarised() -> None:
    now = [0.0]
    stream = io.StringIO()
    handler = NodeHandler(stream, RepeatLimiter(3, 60.0, clock=lambda: now[0]))
    handler.setFormatter(TextFormatter())
    for index in range(50):
        now[0] += 0.1
        handler.handle(_record("Unknown PDU type received '0x%02x'", index, name="pynetdicom.dul"))
        handler.handle(_record("instance stored", level=logging.INFO))
    handler.handle(_record("another error"))
    written = stream.getvalue()
    assert written.count("Unknown PDU type") == 3
    assert written.count("instance stored") == 50  # INFO is never limited
    assert "suppressed" not in written
    now[0] += 61.0
    handler.handle(_record("after the window", level=logging.INFO))
    summary = [line for line in _lines(stream.getvalue()) if "suppressed 47 similar" in line]
    assert len(summary) == 1
    assert "logger=pynetdicom.dul" in summary[0]
    handler.handle(_record("Unknown PDU type received '0x%02x'", 1, name="pynetdicom.dul"))
    assert stream.getvalue().count("ERROR pynetdicom.dul Unknown PDU type") == 4  # a new window


def test_close_writes_what_is_still_suppressed() -> None:
    stream = io.StringIO()
    handler = NodeHandler(stream, RepeatLimiter(1, 60.0))
    handler.setFormatter(JsonFormatter())
    for _ in range(5):
        handler.handle(_record("disk full"))
    handler.close()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["msg"] for e in entries] == ["disk full", "suppressed 4 similar"]
    assert entries[1]["logger"] == "pacs_node.x"


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"resourceType": "Bundle", "entry": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def test_no_request_url_reaches_the_log_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    """A real Patient search through httpx: the identifier in its URL is not logged."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        configure_logging("INFO", "text")
        url = f"http://127.0.0.1:{server.server_port}/fhir/Patient"
        with httpx.Client() as client:
            response = client.get(url, params={"identifier": "urn:oid:1.2.3|PHI-DOE-991234"})
        assert response.status_code == 200
        logging.getLogger("pacs_node.test").info("after the request")
        configure_logging("DEBUG", "json")  # DEBUG for the node, still not for the libraries
        with httpx.Client() as client:
            client.get(url, params={"identifier": "urn:oid:1.2.3|PHI-ROE-445566"})
        logging.getLogger("pacs_node.test").debug("after the second request")
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "after the request" in err
    assert "after the second request" in err
    assert "PHI-DOE-991234" not in err
    assert "PHI-ROE-445566" not in err
    assert "HTTP Request" not in err


def test_a_library_can_be_made_verbose_on_purpose(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text", verbose_libraries=["httpx"])
    assert logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    configure_logging("INFO", "text")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)


def test_warnings_are_logged_without_the_values_they_quote(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pydicom judges a birth date and a sex and quotes them, as a warning and a log record."""
    import warnings

    from pydicom import config as pydicom_config
    from pydicom.dataset import Dataset

    saved = pydicom_config.settings.reading_validation_mode
    try:
        configure_logging("INFO", "text")
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(False)  # pytest's own catch_warnings replaced logging's
            logging.captureWarnings(True)
            ds = Dataset()
            ds.PatientBirthDate = "1947-03-21"
            ds.PatientSex = "Zyxwarbl"
            assert (ds.PatientBirthDate, ds.PatientSex) == ("1947-03-21", "Zyxwarbl")
            warnings.warn("Patient Zyxwarbl^Quentessa, ID ZQ7741903", UserWarning, stacklevel=1)
        logging.getLogger("highdicom.seg.sop").warning("invalid value %s", "Zyxwarbl")  # a child
    finally:
        pydicom_config.settings.reading_validation_mode = saved
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if " py.warnings " in line]
    assert len(warned) >= 3, err  # each assignment, each read, and ours
    assert "WARNING pydicom Invalid value for VR DA" in err  # what was wrong stays readable
    assert "py.warnings Invalid value for VR CS" in err
    assert "category=UserWarning where=valuerep.py:" in err
    assert "where=test_logs.py:" in err
    assert "WARNING highdicom.seg.sop invalid value …" in err
    for value in ("1947-03-21", "Zyxwarbl", "Quentessa", "ZQ7741903"):
        assert value not in err
