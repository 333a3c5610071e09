"""TLS contexts for DICOM (PS3.15 B.9, the BCP 195 profile of RFC 9325), reloaded when their files
change.

Both ends use one profile: TLS 1.3, or TLS 1.2 limited to ECDHE key exchange with AES-GCM; no
TLS compression, no renegotiation, nothing older than TLS 1.2. The Storage SCP builds its
server context from ``tls_cert_file`` / ``tls_key_file`` / ``tls_ca_file`` (client certificates
required when ``tls_require_client_cert``, verified when offered and a CA is given, checked
against ``tls_crl_file`` when set); a DIMSE destination builds a client context from its own CA
and optional client certificate.

A :class:`ReloadingContext` looks at its files' size and modification time at most once a
second when a context is asked for, so a renewed certificate is used by the next connection
without a restart; a new file that does not load leaves the context in use as it was (one
warning per new version of the files). :meth:`ReloadingContext.served` gives ``/metrics``
the expiry of the certificate it serves, and whether a newer file was refused.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

log = logging.getLogger(__name__)

# TLS 1.2 cipher suites of the profile (TLS 1.3 suites are all AEAD and kept as OpenSSL has them).
TLS12_CIPHERS = "ECDHE+AESGCM"
RELOAD_CHECK_S = 1.0


class TLSFileError(ValueError):
    """A certificate, key or CA file that is missing or does not load; ``key`` names the setting."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The files one context is built from (any may be None)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    crl_file: Path | None = None  # the server's only: revoked client certificates

    def paths(self) -> tuple[Path, ...]:
        files = (self.cert_file, self.key_file, self.ca_file, self.crl_file)
        return tuple(p for p in files if p is not None)


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _check_exists(key: str, path: Path) -> None:
    if not path.is_file():
        raise TLSFileError(key, f"{path} does not exist or is not a file")


def _load_ca(context: ssl.SSLContext, prefix: str, ca_file: Path) -> None:
    _check_exists(f"{prefix}tls_ca_file", ca_file)
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSFileError(f"{prefix}tls_ca_file", f"{ca_file} does not load: {_why(exc)}") from exc


def _load_crl(context: ssl.SSLContext, crl_file: Path) -> None:
    """Client certificates checked against the CA's CRL (the leaf only)."""
    _check_exists("tls_crl_file", crl_file)
    try:
        x509.load_pem_x509_crl(crl_file.read_bytes())  # OpenSSL would skip one that is not
        context.load_verify_locations(cafile=str(crl_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSFileError("tls_crl_file", f"{crl_file} does not load: {_why(exc)}") from exc
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _load_chain(context: ssl.SSLContext, prefix: str, cert: Path, key: Path) -> None:
    _check_exists(f"{prefix}tls_cert_file", cert)
    _check_exists(f"{prefix}tls_key_file", key)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSFileError(
            f"{prefix}tls_cert_file", f"{cert} with key {key} does not load: {_why(exc)}"
        ) from exc


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__


def server_context(files: TLSFiles, require_client_cert: bool) -> ssl.SSLContext:
    """The SCP's context; raises :class:`TLSFileError` naming the setting at fault."""
    if files.cert_file is None or files.key_file is None:
        raise TLSFileError("tls_cert_file", "the TLS port needs tls_cert_file and tls_key_file")
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, "", files.cert_file, files.key_file)
    if files.ca_file is not None:
        _load_ca(context, "", files.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        if files.crl_file is not None:
            _load_crl(context, files.crl_file)
    elif require_client_cert:
        raise TLSFileError("tls_ca_file", "tls_require_client_cert needs tls_ca_file")
    return context


def client_context(files: TLSFiles, prefix: str = "") -> ssl.SSLContext:
    """An SCU's context: the peer's certificate verified against ``ca_file`` (the system's CAs
    when None) and its host name checked; a client certificate when ``cert_file`` is given."""
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if files.ca_file is not None:
        _load_ca(context, prefix, files.ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if files.cert_file is not None or files.key_file is not None:
        if files.cert_file is None or files.key_file is None:
            raise TLSFileError(f"{prefix}tls_cert_file", "give tls_cert_file and tls_key_file")
        _load_chain(context, prefix, files.cert_file, files.key_file)
    return context


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int], ...]:
    found = []
    for path in paths:
        try:
            stat = path.stat()
            found.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            found.append((-1, -1))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Served:
    """What a :class:`ReloadingContext` serves: the expiry of the certificate and of the CA
    bundle it loaded (read when it was built), and whether the files on disk changed into
    ones that do not load (the previous ones still serve)."""

    cert_not_after: datetime | None
    ca_not_after: datetime | None
    refused: bool


class ReloadingContext:
    """An ``ssl.SSLContext`` rebuilt when one of its files changes; raises at construction when
    the files do not load (the node does not start), never afterwards."""

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        paths: tuple[Path, ...],
        check_every_s: float = RELOAD_CHECK_S,
        files: TLSFiles | None = None,
    ) -> None:
        self._build = build
        self._paths = paths
        self._files = files or TLSFiles()
        self._check_every_s = check_every_s
        self._lock = threading.Lock()
        self._signature = _signature(paths)
        self._context = build()
        self._expiry = self._read_expiry()
        self._checked = time.monotonic()
        self._refused: tuple[tuple[int, int], ...] | None = None

    def _read_expiry(self) -> tuple[datetime | None, datetime | None]:
        cert, ca = self._files.cert_file, self._files.ca_file
        return (
            not_after(cert) if cert is not None else None,
            not_after(ca) if ca is not None else None,
        )

    def served(self) -> Served:
        """What new connections get now (the files checked for a change first)."""
        self.context()
        with self._lock:
            cert, ca = self._expiry
            return Served(cert, ca, self._refused is not None)

    def context(self) -> ssl.SSLContext:
        """The context for a new connection (rebuilt first when the files changed)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self._check_every_s:
                return self._context
            self._checked = now
            signature = _signature(self._paths)
            if signature in (self._signature, self._refused):
                return self._context
            try:
                context = self._build()
            except (TLSFileError, ssl.SSLError, OSError) as exc:
                self._refused = signature
                log.warning(
                    "TLS files changed but do not load; the previous certificate stays in use",
                    extra={"reason": str(exc)},
                )
                return self._context
            self._context, self._signature, self._refused = context, signature, None
            self._expiry = self._read_expiry()
            log.info("TLS certificate reloaded", extra={"files": [str(p) for p in self._paths]})
            return self._context


def reloading_server_context(files: TLSFiles, require_client_cert: bool) -> ReloadingContext:
    """The SCP's context, built once per process for these settings and reloaded on change
    (so ``/metrics`` reports what the same rules serve)."""
    key = ("server", files, require_client_cert)
    with _sources_lock:
        source = _sources.get(key)
        if source is None:
            source = ReloadingContext(
                lambda: server_context(files, require_client_cert), files.paths(), files=files
            )
            _sources[key] = source
    return source


_sources: dict[tuple[str, TLSFiles, bool], ReloadingContext] = {}
_sources_lock = threading.Lock()


def client_source(files: TLSFiles, prefix: str = "") -> ReloadingContext:
    """The client context's source for these files, built once per process."""
    key = ("client", files, False)
    with _sources_lock:
        source = _sources.get(key)
        if source is None:
            source = ReloadingContext(
                lambda: client_context(files, prefix), files.paths(), files=files
            )
            _sources[key] = source
    return source


def shared_client_context(files: TLSFiles, prefix: str = "") -> ssl.SSLContext:
    """The client context for these files, built once per process and reloaded on change."""
    return client_source(files, prefix).context()


def not_after(path: Path) -> datetime | None:
    """The earliest expiry of the certificates in a PEM file (None when it cannot be read)."""
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None
    return min((c.not_valid_after_utc for c in certificates), default=None)


def subject_text(der: bytes | None) -> str | None:
    """A DER certificate's subject as an RFC 4514 string (``CN=CT1,O=Hospital``)."""
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return None


# Attribute names a configured subject may use beyond those RFC 4514 defines (CN, L, ST, O, OU,
# C, STREET, DC, UID), in any letter case; any attribute may also be given as a dotted OID.
_MORE_NAMES = {
    "EMAILADDRESS": x509.NameOID.EMAIL_ADDRESS,
    "E": x509.NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": x509.NameOID.SERIAL_NUMBER,
}
_RFC4514_NAMES = frozenset({"CN", "L", "ST", "O", "OU", "C", "STREET", "DC", "UID"})
_COMPONENT = re.compile(r"(?<!\\)[,+]")


def parse_subject(text: str) -> x509.Name:
    """A distinguished name as written in configuration or shown by a certificate: RFC 4514,
    with attribute names in any letter case, ``emailAddress`` and ``serialNumber`` too, and
    spaces after the commas allowed. Raises ValueError saying what is wrong."""
    parts = []
    start = 0
    for match in [*_COMPONENT.finditer(text), None]:
        end = match.start() if match else len(text)
        component = text[start:end].strip()
        separator = match.group() if match else ""
        start = match.end() if match else end
        name, equals, value = component.partition("=")
        name = name.strip().upper()
        if not equals or not name:
            raise ValueError(f"{component[:40]!r} is not NAME=VALUE")
        known = name in _RFC4514_NAMES or name in _MORE_NAMES
        if not known and not re.fullmatch(r"[0-9]+(\.[0-9]+)+", name):
            raise ValueError(
                f"unknown attribute {name[:20]!r} (use CN, O, OU, C, L, ST, STREET, DC, UID,"
                " emailAddress, serialNumber or a dotted OID)"
            )
        parts.append(f"{name}={value.strip()}{separator}")
    try:
        return x509.Name.from_rfc4514_string("".join(parts), _MORE_NAMES)
    except ValueError as exc:
        raise ValueError(f"not a distinguished name: {text[:80]!r}") from exc


def subject_matches(expected: str, subject: str | None) -> bool:
    """Whether a certificate subject is the one a peer declares: a distinguished name (``CN=CT1,
    O=Hospital``: the same attributes, in any order, values compared without regard to letter
    case) or, without ``=``, the common name alone (the certificate must have exactly one)."""
    if subject is None:
        return False
    try:
        actual = parse_subject(subject)
    except ValueError:
        return False
    if "=" not in expected:
        names = actual.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return len(names) == 1 and _fold(names[0].value) == _fold(expected.strip())
    try:
        wanted = parse_subject(expected)
    except ValueError:
        return False
    return _pairs(wanted) == _pairs(actual)


def _fold(value: str | bytes) -> str:
    return (value.decode(errors="replace") if isinstance(value, bytes) else value).casefold()


def _pairs(name: x509.Name) -> frozenset[tuple[str, str]]:
    return frozenset((a.oid.dotted_string, _fold(a.value)) for a in name)
