"""Reasons fit to store: error text reduced to words we know, before it enters the catalog.

The catalog keeps why a job failed or a delivery waits, and people read it in ``jobs``,
``deliveries`` and the dashboard. The raw text is not fit to keep: an exception from a library
quotes the value it choked on, an EHR's error body names the patient, a URL carries the
Patient ID. :func:`scrub_reason` keeps what helps an operator and cannot identify anyone:

- an exception's class name (``ReadTimeout``), HTTP and DIMSE status codes (``503``,
  ``0xA700``), DICOM UIDs, short numbers, ``file.py:123`` locations;
- words from a fixed vocabulary of the node's own messages and of common network and
  filesystem errors (``connection refused``, ``no space left on device``);
- a URL as its scheme, host and port only.

Everything else becomes ``…``: quoted values, bodies (from the first ``{`` or markup tag on),
words outside the vocabulary (names), long or joined numbers (IDs, dates). The result is one
line of at most :data:`MAX_REASON` characters. It is a whitelist, so a new message of ours
with a word outside the vocabulary loses that word, never leaks it: add the word here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MAX_REASON = 300
GAP = "…"
SCRUBBED_DETAIL = frozenset({"error", "reason", "last_error"})  # event detail keys with free text

_WORDS = """
a able about absent accept accepted access acquisitions action address addresses ae affine
after again algorithm all allowed already among an and another answer answered answers any
are array as asked assertion association at attempt attempts attribute auth authentication
authorization available background backslash bad bad-request be been before below besides
between blank body both broken build built bundle busy but by callable called calling can
cannot catalog center certificate channel channel-first channels characters check choose
claimed class classical client clip closed code coded codes column columns commit commitment
commitments committed config configs configuration configured conflict connect connected connection
connections contains content context contexts corrupt could cover create created data
database dataset datetimes dead declares decode decoded def degrees delivered deliveries
delivery denied destination destinations device did died differ different differs dimensions
dimse directory disconnected disk does done drift due dynamic each either empty encode
encoded encoding encodings end entries entry environment errno error errors exactly exceeded
exist exists expected expects expired expression extras f failed failure false fatal file files fill
first fits floor folder for forbidden format found frame free from full gantry gap gap-filled
gaps gateway gave give given gives giving got grid grids handler has have header headers
held hold holds host http https identifier identifiers image images in incomplete infer
information input installed instance instances integers internal into invalid io is issue
issues it its job jobs json keys kind kinds known label labelmap labels lack larger last
laterality least leave left left-over length let letters level lie limit line list listed
load loaded loc localizer locked login long-running lost many map mapping match matched
matches matrix max may meaning means median metadata method migrates min missing mixed ml mm
modalities modality model models moved more most msg multi-phase multiple must naive name
names need needed needs network never no node non-empty non-negative none nonzero normal not
nothing number numbers object objects of off on once one only open or orientation
orientations orthonormal other out outcome output outputs over own pacs-node pad parallel
parcels parse parsed pass patch path paths patient patients payload peer peers period
permanent permission pick pipe pixel port positions positive pred preprocessing presentation
printable probabilities probability process produce protocol pt quiet range rate read
readable reason received redirect redirected reference referenced refused regular rejected
remote repeat replaced reply report request requested requests required resampled resampling
reserved reset resolution resource response responses result results retry retry-after
return returned revision right row rows rule rules run running s safe same schema scheme
search second seconds segment segmenting send sending sent separate sequence series serve
server service set several severity shape should size sizes slab slice slices so some source
space spacing split spool stacked stage start started status step still storage store
stored string structure studies study such system takes target temporary tensor than that
the them there this those three tilt tilted time timed timeout times title to too top
transaction transient true ts twice type unauthorized uneven unique unknown unreachable
unreadable unsupported up upload use valid value values variable vectors version vocabulary
volume voxel wait warning was weights were when while width window with without worker
workers write written wrong x y yaml z zscore zyx
abort aborted allowed backoff belongs bytes can cap certificate claim claims couldn deadline
deflate deflated didn doesn don duplicate elapsed entity eof exceeds gone handshake identity
inflate issuer large lease length location mismatch moved nodename operation owner page
permanently precondition processing provided quarantine quarantined reclaimed release
released retries see servname smaller stall stalled statuses supported syntax transfer
unexpected unexpectedly unprocessable url verify wasn within won discarded down hours later
local minute minutes named now occurred offline online outage pool quota reasons reassigned
route unavailable until violation warnings allowlist sha256 listed
unable get used self signed self-signed chain hostname
trusted our revoked yet valid
performed procedure completed discontinued mpps
"""
VOCABULARY = frozenset(_WORDS.split())

# Spelled exactly so: acronyms, standard names, resource types.
_TERMS = """
A AE ASCII C-ECHO C-FIND C-MOVE C-STORE CPU CR CT CUDA DICOM DICOM-SEG DIMSE DNS DX EHR FHIR
GET GPU GSPS HTTP HTTPS I ID IP JSON KOS MG MPPS MR MiB GiB KiB MB GB NM N-ACTION
N-EVENT-REPORT OK PACS PDF PDU POST PT PUT QIDO-RS RAS LPS RT SCP SCU SEG SNOMED SOP SR
STOW-RS TCP TLS SSL CA UID UIDs URL US UTC WADO-RS XA YAML OperationOutcome DiagnosticReport SHA-256
Observation ImagingStudy Bundle Patient MetaTensor
CERTIFICATE_VERIFY_FAILED WRONG_VERSION_NUMBER TLSV1_ALERT_UNKNOWN_CA TLSV1_ALERT_PROTOCOL_VERSION
SSLV3_ALERT_HANDSHAKE_FAILURE SSLV3_ALERT_BAD_CERTIFICATE TLSV13_ALERT_CERTIFICATE_REQUIRED
NO_SHARED_CIPHER UNSUPPORTED_PROTOCOL
VR AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR UT UV
"""
TERMS = frozenset(_TERMS.split())

_EXCEPTION_SUFFIXES = ("Error", "Exception", "Timeout", "Warning", "Exit", "Interrupt", "Refused")
_CAMEL = re.compile(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+")

_BODY = re.compile(r"[{]|<[A-Za-z!?/]")
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://([^/\s'\"?#]+)[^\s'\"]*")
_QUOTED = re.compile(r"(?<![A-Za-z0-9])(['\"`])[^\n]*?\1(?![A-Za-z0-9])")
_JOINED_NUMBERS = re.compile(r"\d+(?:[-#/|^_,]\d+)+")
_DOTTED_DATE = re.compile(r"(?<![\d.])\d{1,2}\.\d{1,2}\.\d{2,4}(?![\d.])")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_TOKEN = re.compile(
    r"(?P<hex>0x[0-9A-Fa-f]{1,8}\b)"
    r"|(?P<file>[A-Za-z_][A-Za-z0-9_]*\.py(?::\d+)?)"
    r"|(?P<uid>\d+(?:\.\d+){2,})"
    r"|(?P<number>\d+(?:\.\d+)?)"
    r"|(?P<word>[A-Za-z][A-Za-z0-9]*(?:[-_][A-Za-z0-9]+)*)"
    r"|(?P<space>\s+)"
    r"|(?P<other>.)",
    re.DOTALL,
)
_PUNCTUATION = set(":;,.()[]=/-+<>%!?'\"*@" + GAP)
MAX_DIGITS = 5  # a longer run of digits may be a Patient ID or a date


def _word_ok(word: str) -> bool:
    if word in TERMS:
        return True
    if _CAMEL.fullmatch(word):
        return word.endswith(_EXCEPTION_SUFFIXES)
    if len(word) == 1:
        return word.islower() or word in TERMS
    lower = word.lower()
    if not (word.islower() or word == lower.capitalize()):
        return False  # DOE, McDonald: a name, or at least not a word we know
    parts = re.split(r"[-_]", lower)
    return lower in VOCABULARY or all(part in VOCABULARY for part in parts)


def _uid_ok(text: str) -> bool:
    return len(text) <= 64 and all(
        part == "0" or not part.startswith("0") for part in text.split(".")
    )


def _tokens(text: str, names: dict[str, str]) -> list[str]:
    out: list[str] = []
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind == "space":
            out.append(" ")
            continue
        keep = (
            value in names
            or kind in ("hex", "file")
            or (kind == "uid" and _uid_ok(value))
            or (kind == "number" and len(value.split(".")[0]) <= MAX_DIGITS)
            or (kind == "word" and _word_ok(value))
            or (kind == "other" and value in _PUNCTUATION)
        )
        out.append(value if keep else GAP)
    return out


def _squeeze(tokens: list[str]) -> str:
    """Join tokens; runs of gaps (with the spaces and punctuation between them) become one."""
    text = "".join(tokens)
    text = re.sub(rf"{GAP}(?:[\s{re.escape(''.join(_PUNCTUATION - {GAP}))}]*{GAP})+", GAP, text)
    return re.sub(r"\s+", " ", text).strip()


def _bound(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + GAP


def _protect(text: str, known: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Replace each known name (a destination, a model: configuration, not patient data) by a
    placeholder word the later steps keep."""
    names: dict[str, str] = {}
    for name in sorted({n for n in known if n and len(n) <= 64}, key=len, reverse=True):
        placeholder = f"Knownname{len(names)}z"
        pattern = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w-])")
        text, count = pattern.subn(placeholder, text)
        if count:
            names[placeholder] = name
    return text, names


def scrub_text(text: str, limit: int = MAX_REASON, known: Iterable[str] = ()) -> str:
    """``text`` reduced to known words, codes, UIDs and the ``known`` names, on one line, at
    most ``limit`` long."""
    text = _CONTROL.sub(" ", text)
    body = _BODY.search(text)
    if body is not None:
        text = text[: body.start()] + GAP
    text, names = _protect(text, known)

    def url(match: re.Match[str]) -> str:  # the host and port are configuration: kept
        placeholder = f"Knownname{len(names)}z"
        names[placeholder] = match.group(2)
        return f"{match.group(1)}://{placeholder}/{GAP}"

    text = _URL.sub(url, text)
    text = _QUOTED.sub(lambda m: m.group() if m.group()[1:-1] in names else GAP, text)
    text = _JOINED_NUMBERS.sub(GAP, text)
    text = _DOTTED_DATE.sub(GAP, text)
    tokens = [names.get(token, token) for token in _tokens(text, names)]
    return _bound(_squeeze(tokens), limit)


def scrub_reason(
    reason: str | BaseException, limit: int = MAX_REASON, known: Iterable[str] = ()
) -> str:
    """The reason to store: an exception as ``Class: scrubbed message``, a text scrubbed;
    ``known`` names (the destination, the model) are kept as they are.

    Idempotent, so a catalog function may scrub what its caller already scrubbed."""
    if isinstance(reason, BaseException):
        kind = type(reason).__name__
        message = scrub_text(str(reason), limit, known)
        return _bound(f"{kind}: {message}" if message and message != GAP else kind, limit)
    return scrub_text(reason, limit, known)


def scrub_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """An event's details with its free-text fields (``error``, ``reason``) scrubbed; the
    event's other string fields (destination, model) count as known names."""
    names = [str(v) for k, v in detail.items() if k not in SCRUBBED_DETAIL and isinstance(v, str)]
    return {
        k: scrub_reason(str(v), known=names) if k in SCRUBBED_DETAIL else v
        for k, v in detail.items()
    }
