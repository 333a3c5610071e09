"""The web face's TLS context: the node's certificate (``tls_cert_file``, ``tls_key_file``),
optionally client certificates checked against ``tls_ca_file``.

Policy (BCP 195, RFC 9325): TLS 1.2 or 1.3 only; TLS 1.2 limited to ECDHE key exchange with
AES-GCM (forward secrecy, an AEAD cipher); TLS 1.3's own suites are all acceptable. A file that
cannot be read, or a key that does not fit the certificate, fails the start with the key's name.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pacs_node.config import NodeOptions
from pacs_node.errors import ConfigError

TLS12_CIPHERS = "ECDHE+AESGCM"


def server_context(options: NodeOptions, source: str = "node.yaml") -> ssl.SSLContext:
    """The context uvicorn serves HTTPS with; ``source`` names where the keys were set."""
    cert, key = options.tls_cert_file, options.tls_key_file
    if cert is None or key is None:
        raise ConfigError(source, "tls_cert_file", "HTTPS needs tls_cert_file and tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _readable(cert, source, "tls_cert_file")
    _readable(key, source, "tls_key_file")
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            source, "tls_key_file", f"not a PEM key that fits tls_cert_file: {exc}"
        ) from exc
    if options.tls_ca_file is not None:
        _readable(options.tls_ca_file, source, "tls_ca_file")
        try:
            context.load_verify_locations(cafile=str(options.tls_ca_file))
        except ssl.SSLError as exc:
            raise ConfigError(source, "tls_ca_file", f"not a PEM CA bundle: {exc}") from exc
        context.verify_mode = (
            ssl.CERT_REQUIRED if options.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    elif options.tls_require_client_cert:
        raise ConfigError(source, "tls_ca_file", "tls_require_client_cert needs a CA bundle")
    return context


def _readable(path: Path, source: str, key: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.strerror}") from exc
