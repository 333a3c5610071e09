"""A patient that must never show in the node's logs or stored error text, and the searches
that prove it: every log line at INFO and above, and every catalog column that keeps error
text (``error``, ``last_error``, ``reason``, ``detail`` ... of every table)."""

from __future__ import annotations

import http.server
import re
import sqlite3
import threading
import warnings
from pathlib import Path

from pydicom import dcmread

NAME = "Zyxwarbl^Quentessa"
PATIENT_ID = "ZQ7741903"
BIRTH_DATE = "1947-03-21"  # dashes: not a valid DA, so pydicom's validation quotes it
# What a search looks for: each name part, the ID, and the birth date in three spellings.
NEEDLES = ("Zyxwarbl", "Quentessa", PATIENT_ID, BIRTH_DATE, "19470321", "21.03.1947")
ERROR_COLUMNS = re.compile(r"error|reason|detail|message|note", re.IGNORECASE)
_LEVEL = re.compile(r"^\S+ (INFO|WARNING|ERROR|CRITICAL) ")


def mark_patient(paths: list[Path]) -> None:
    """Rewrite each file with this patient (invalid birth date included)."""
    for path in paths:
        ds = dcmread(path)
        ds.PatientName = NAME
        ds.PatientID = PATIENT_ID
        with warnings.catch_warnings():  # judged here too; the node's judgement is the test
            warnings.simplefilter("ignore")
            ds.PatientBirthDate = BIRTH_DATE
        ds.OtherPatientIDs = PATIENT_ID
        ds.save_as(path, enforce_file_format=True)


def found(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle.lower() in text.lower()]


def log_leaks(log_text: str) -> list[str]:
    """Lines at INFO and above (a record's indented continuation included) naming the patient."""
    leaks: list[str] = []
    keep = False
    for line in log_text.splitlines():
        if not line.startswith(" "):
            keep = bool(_LEVEL.match(line))
        if keep and found(line):
            leaks.append(line)
    return leaks


def catalog_leaks(catalog: Path) -> list[str]:
    """``table.column: value`` for every error-text value of the SQLite catalog naming the
    patient. The audit trail (tables ``audit*``) names patients by design and is left out."""
    leaks: list[str] = []
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            if table.startswith(("audit", "sqlite_", "alembic")):
                continue
            columns = [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
            for column in filter(ERROR_COLUMNS.search, columns):
                for (value,) in db.execute(f'SELECT "{column}" FROM "{table}"'):
                    if value is not None and found(str(value)):
                        leaks.append(f"{table}.{column}: {value}")
    return leaks


def error_texts(catalog: Path) -> int:
    """How many non-empty error-text values the catalog holds (a search of none proves none)."""
    count = 0
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
            for column in filter(ERROR_COLUMNS.search, columns):
                sql = f'SELECT COUNT(*) FROM "{table}" WHERE "{column}" IS NOT NULL'
                count += db.execute(sql).fetchone()[0]
    return count


class _Naming(http.server.BaseHTTPRequestHandler):
    """Answers every request 500, its body naming the patient (as some EHRs do)."""

    protocol_version = "HTTP/1.1"
    BODY = f"Patient {NAME} (MRN {PATIENT_ID}, born {BIRTH_DATE}) is locked by another user"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = self.BODY.encode()
        self.send_response(500)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: object) -> None:
        return


class NamingServer:
    """An HTTP server on ``127.0.0.1:port`` answering 500 with the patient's name, until
    :meth:`stop`."""

    def __init__(self, port: int) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Naming)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
