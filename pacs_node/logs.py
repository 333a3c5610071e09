"""Structured logs on stderr: one line per event, with UIDs and counts as key=value (or JSON).

Patient names and IDs are never passed to a logger; callers put UIDs and counts in ``extra``.

Every record is rendered by the node's own handler, third-party records included, so three
rules hold for all of them:

- One record is one line. CR, LF, tab, the other C0 and C1 controls, DEL and the Unicode line
  separators in the message, its arguments and its fields are written as escapes (``\\r``,
  ``\\x1b``), so a value from the wire (an AE title inside pynetdicom's own message) cannot
  start a forged line. A traceback keeps its line breaks but every line of it is indented; a
  library's traceback is shortened to ``exc=Type (file:line)`` unless the level is DEBUG.
- The same logger and message template at WARNING or above is written at most
  ``repeat_limit`` times per ``repeat_window_s``; then one ``suppressed K similar`` line says
  how many were left out. A flood of malformed requests cannot fill the disk with logs.
- Libraries that write request URLs, headers or data sets at INFO or DEBUG (httpx, httpcore,
  urllib3, dicomweb-client, uvicorn's access log, pynetdicom) stay at WARNING unless named
  in ``verbose_libraries``: a FHIR Patient search URL holds the Patient ID.
- Python warnings (:mod:`warnings`) are logged too (``logging.captureWarnings``), and they
  and pydicom's and highdicom's records at INFO and above are scrubbed first
  (:func:`pacs_node.redact.scrub_text`): pydicom's validation messages quote the element values
  they judge (``Invalid value for VR DA: '<birth date>'``), so only the category, the place and
  known words are written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from pacs_node.redact import scrub_text

if TYPE_CHECKING:
    from pacs_node.config import NodeOptions

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
OWN_PREFIX = "pacs_node"
SUMMARY_LOGGER = "pacs_node.logs"

# Loggers that carry request URLs, headers, bodies or whole data sets below WARNING.
QUIET_LIBRARIES = (
    "pynetdicom",  # every PDU at INFO, whole data sets at DEBUG
    "httpx",  # "HTTP Request: GET <url with the Patient ID>" at INFO
    "httpcore",
    "h11",
    "h2",
    "hpack",
    "urllib3",  # dicomweb-client's requests session: URLs at DEBUG
    "requests",
    "dicomweb_client",  # URLs and headers (credentials) at DEBUG
    "uvicorn.access",  # request lines with query strings (QIDO PatientID=...)
    "multipart",
    "apscheduler",
    "alembic",
    "highdicom",  # one line per copied module and per encoded frame
    "openjpeg",
)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: every control character written as an escape."""
    return _CONTROL.sub(_escape_char, text)


def escape_block(text: str) -> str:
    """Like :func:`escape`, but line breaks stay (for tracebacks, which are indented)."""
    return _CONTROL_BUT_NEWLINE.sub(_escape_char, text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _message(record: logging.LogRecord) -> str:
    try:
        return escape(record.getMessage())
    except (TypeError, ValueError):  # arguments that do not fit the template: keep both
        return escape(f"{record.msg!s} {record.args!r}")


def _own(record: logging.LogRecord) -> bool:
    return record.name == OWN_PREFIX or record.name.startswith(OWN_PREFIX + ".")


def _short_exception(record: logging.LogRecord) -> str | None:
    """``Type (file:line)`` of a library record's exception: its message is already logged."""
    if not record.exc_info or record.exc_info[0] is None:
        return None
    kind, _value, tb = record.exc_info
    frames = traceback.extract_tb(tb) if tb is not None else []
    where = f" ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{kind.__name__}{where}"


class _Base(logging.Formatter):
    def __init__(self, full_library_tracebacks: bool = False) -> None:
        super().__init__()
        self.full_library_tracebacks = full_library_tracebacks

    def _exception(self, record: logging.LogRecord) -> tuple[str | None, str | None]:
        """(full traceback, short form): one of them, or neither."""
        if not record.exc_info:
            return None, None
        if not _own(record) and not self.full_library_tracebacks:
            return None, _short_exception(record)
        return escape_block(self.formatException(record.exc_info)), None


class TextFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, escape(record.name), _message(record)]
        full, short = self._exception(record)
        fields = _fields(record)
        if short is not None:
            fields["exc"] = short
        for key, value in fields.items():
            text = escape(str(value))
            parts.append(f"{escape(key)}={json.dumps(text) if (' ' in text or not text) else text}")
        line = " ".join(parts)
        if full is not None:
            line += "\n" + "\n".join("    " + row for row in full.splitlines())
        if record.stack_info:
            line += "\n" + "\n".join(
                "    " + row for row in escape_block(record.stack_info).splitlines()
            )
        return line


class JsonFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": escape(record.name),
            "msg": _message(record),
            **{
                escape(k): v if isinstance(v, (int, float, bool)) else escape(str(v))
                for k, v in _fields(record).items()
            },
        }
        full, short = self._exception(record)
        if full is not None or short is not None:
            entry["exc"] = full if full is not None else short
        if record.stack_info:
            entry["stack"] = escape_block(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


_NUMBERS = re.compile(r"'[^']*'|\"[^\"]*\"|0x[0-9A-Fa-f]+|\d+")


def template_of(record: logging.LogRecord) -> str:
    """The shape of a message: its template, with quoted values and numbers blanked (libraries
    format their messages before logging them, so the template alone would differ each time)."""
    return _NUMBERS.sub("#", str(record.msg))[:160]


class RepeatLimiter:
    """At most ``limit`` records per (logger, level, template) per window; counts the rest."""

    SWEEP_S = 1.0
    MAX_KEYS = 4096

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        # key -> [window start, records seen, records suppressed]
        self._windows: dict[tuple[str, int, str], list[float]] = {}
        self._swept = clock()

    def admit(
        self, record: logging.LogRecord
    ) -> tuple[bool, list[tuple[tuple[str, int, str], int]]]:
        """Whether to write ``record``, and the (key, count) of windows that closed with
        suppressed records (their summary lines are due now)."""
        if self.limit <= 0:
            return True, []
        now = self.clock()
        with self._lock:
            due = self._sweep(now) if now - self._swept >= self.SWEEP_S else []
            if record.levelno < logging.WARNING:
                return True, due
            key = (record.name, record.levelno, template_of(record))
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                if window is not None and window[2]:
                    due.append((key, int(window[2])))
                if len(self._windows) >= self.MAX_KEYS:
                    self._windows.pop(next(iter(self._windows)))
                self._windows[key] = [now, 1, 0]
                return True, due
            window[1] += 1
            if window[1] <= self.limit:
                return True, due
            window[2] += 1
            return False, due

    def _sweep(self, now: float) -> list[tuple[tuple[str, int, str], int]]:
        self._swept = now
        due: list[tuple[tuple[str, int, str], int]] = []
        for key, window in list(self._windows.items()):
            if now - window[0] >= self.window_s:
                if window[2]:
                    due.append((key, int(window[2])))
                del self._windows[key]
        return due

    def drain(self) -> list[tuple[tuple[str, int, str], int]]:
        """Every window's suppressed count, for the summary lines written at shutdown."""
        with self._lock:
            due = [(key, int(w[2])) for key, w in self._windows.items() if w[2]]
            self._windows.clear()
        return due


WARNINGS_LOGGER = "py.warnings"
# Loggers whose records may quote element values (patient data), their children included:
# their records at INFO and above are scrubbed before anything else reads them.
SCRUBBED_LIBRARIES = (WARNINGS_LOGGER, "pydicom", "highdicom")
_WARNING = re.compile(r"^(?:.*[/\\])?(?P<place>[^/\\:]+:\d+): (?P<category>\w+): (?P<text>.*)$")


def scrub_record_text(message: str) -> tuple[str, dict[str, str]]:
    """A library's message reduced to what cannot identify anyone, and the fields it had: a
    warning (``file.py:12: UserWarning: text``, its source line dropped) keeps its category
    and place; the text keeps the words of :mod:`pacs_node.redact`'s vocabulary."""
    first = message.split("\n", 1)[0]
    match = _WARNING.match(first)
    if match is None:
        return scrub_text(first), {}
    fields = {"category": match.group("category"), "where": match.group("place")}
    return scrub_text(match.group("text")), fields


def scrub_library_record(record: logging.LogRecord) -> None:
    """Rewrite ``record`` in place when it comes from a :data:`SCRUBBED_LIBRARIES` logger at
    INFO or above (DEBUG stays whole, for diagnosis)."""
    if record.levelno < logging.INFO or not any(
        record.name == name or record.name.startswith(name + ".") for name in SCRUBBED_LIBRARIES
    ):
        return
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        message = str(record.msg)
    text, fields = scrub_record_text(message)
    record.msg, record.args = text, None
    record.__dict__.update(fields)


class NodeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The node's one handler: rate-limits repeats, then formats (and escapes) every record."""

    def __init__(self, stream: TextIO, limiter: RepeatLimiter | None) -> None:
        super().__init__(stream)
        self.limiter = limiter

    def handle(self, record: logging.LogRecord) -> Any:
        scrub_library_record(record)
        if self.limiter is None:
            return super().handle(record)
        admitted, due = self.limiter.admit(record)
        self._summaries(due)
        return super().handle(record) if admitted else False

    def _summaries(self, due: Iterable[tuple[tuple[str, int, str], int]]) -> None:
        assert self.limiter is not None
        for (name, level, template), count in due:
            summary = logging.LogRecord(
                SUMMARY_LOGGER,
                logging.WARNING,
                __file__,
                0,
                "suppressed %d similar",
                (count,),
                None,
            )
            summary.__dict__.update(
                {
                    "logger": name,
                    "level_of": logging.getLevelName(level),
                    "template": template,
                    "window_s": self.limiter.window_s,
                }
            )
            super().handle(summary)

    def close(self) -> None:
        if self.limiter is not None:
            self._summaries(self.limiter.drain())
        super().close()


def configure_logging(
    level: str = "INFO",
    fmt: str = "text",
    *,
    repeat_limit: int = 10,
    repeat_window_s: float = 60.0,
    verbose_libraries: Iterable[str] = (),
) -> None:
    """Send every record (the node's and its libraries', Python warnings too) through one
    escaping, rate-limited handler on stderr; keep the libraries that log URLs or data sets at
    WARNING, and scrub those that quote element values."""
    debug = logging.getLevelName(level) <= logging.DEBUG
    limiter = RepeatLimiter(repeat_limit, repeat_window_s) if repeat_limit > 0 else None
    handler = NodeHandler(sys.stderr, limiter)
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    handler.setFormatter(formatter(full_library_tracebacks=debug))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, NodeHandler):
            old.limiter = None  # its counts go with it; nothing is written twice
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn -> "py.warnings", scrubbed by the handler
    verbose = set(verbose_libraries)
    for name in (*QUIET_LIBRARIES, *sorted(verbose)):
        if name in verbose:
            logging.getLogger(name).setLevel(level)
        else:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def configure_node_logging(options: NodeOptions) -> None:
    """:func:`configure_logging` with the node's options (every process of the node calls it)."""
    configure_logging(
        options.log_level,
        options.log_format,
        repeat_limit=options.log_repeat_limit,
        repeat_window_s=options.log_repeat_window_s,
        verbose_libraries=options.log_verbose_libraries,
    )
