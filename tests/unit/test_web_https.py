"""The web face over HTTPS with a private CA made by the test: a client that trusts the CA
(and shows its certificate, mutual authentication being on) is served, with a Secure session
cookie; a client that does not trust it, one without a certificate, and one offering only old
protocols or ciphers are refused in the handshake. The TLS client of HTTP destinations shows
its certificate to such a server. A certificate renewed on disk serves the next connection.
A missing or unfitting file stops the start."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from pacs_node.config import NodeOptions
from pacs_node.dispatch.http import client_context, exchange
from pacs_node.errors import ConfigError, PermanentDelivery, TransientDelivery
from pacs_node.web.https import web_server_context
from tests.certs import CertificateAuthority, Issued
from tests.conftest import wait_for
from tests.web_node import start_web_node

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _client(ca: CertificateAuthority | None, cert: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert) if ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


def test_the_web_face_serves_https_to_clients_that_trust_its_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue("server", "CN=localhost", hosts=LOOPBACK)
    user = ca.issue("reader", "CN=reader")
    node = start_web_node(
        tmp_path / "var",
        web_tls=True,
        tls_cert_file=server.cert,
        tls_key_file=server.key,
        tls_ca_file=ca.cert,
        web_tls_client_cert="required",
    )
    url = f"https://127.0.0.1:{node.server.port}"
    try:
        answer = httpx.get(f"{url}/login", verify=_client(ca, user), timeout=10)
        assert answer.status_code == 200
        cookie = answer.headers["set-cookie"].lower()
        assert "pacs_node_login=" in cookie
        assert "; secure" in cookie  # served over https: the cookie never travels in clear
        assert httpx.get(f"{url}/healthz", verify=_client(ca, user), timeout=10).is_success

        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/login", verify=_client(None, user), timeout=10)
        with pytest.raises(httpx.HTTPError):  # no client certificate: refused
            httpx.get(f"{url}/login", verify=_client(ca), timeout=10)

        old = _client(ca, user)
        old.minimum_version = ssl.TLSVersion.TLSv1_2
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        old.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-CHACHA20-POLY1305")
        with pytest.raises(httpx.ConnectError):  # TLS 1.2 without AES-GCM
            httpx.get(f"{url}/login", verify=old, timeout=10)
        old.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        assert httpx.get(f"{url}/login", verify=old, timeout=10).status_code == 200

        # the client side of HTTP destinations, against a server that asks for a certificate
        health = f"{url}/healthz"
        mutual = client_context(ca.cert, user.cert, user.key)
        assert exchange("GET", health, timeout_s=10, headers={}, what="t", tls=mutual).status == 200
        with pytest.raises(TransientDelivery):  # no client certificate
            exchange("GET", health, timeout_s=10, headers={}, what="t", tls=client_context(ca.cert))
        with pytest.raises(TransientDelivery, match="CERTIFICATE_VERIFY_FAILED"):
            exchange("GET", health, timeout_s=10, headers={}, what="t")
        with pytest.raises(PermanentDelivery, match="TLS files cannot be used"):
            client_context(tmp_path / "missing.pem")

        # a certificate renewed on disk serves the next connection, without a restart
        renewed = ca.issue("renewed", "CN=localhost", hosts=LOOPBACK)
        server.cert.write_bytes(renewed.cert.read_bytes())
        server.key.write_bytes(renewed.key.read_bytes())
        expected = ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())

        def served() -> bytes | None:
            with (
                socket.create_connection(("127.0.0.1", node.server.port), timeout=5) as raw,
                _client(ca, user).wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                return tls.getpeercert(binary_form=True)

        wait_for(lambda: served() == expected, 10, what="the renewed certificate")
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()


def test_https_settings_that_cannot_work_stop_the_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="web_tls needs tls_cert_file"):
        NodeOptions(web_tls=True)
    ca = CertificateAuthority.create(tmp_path / "pki")
    mine = ca.issue("mine", "CN=localhost", hosts=LOOPBACK)
    other = ca.issue("other", "CN=other")
    missing = NodeOptions(tls_cert_file=tmp_path / "none.pem", tls_key_file=mine.key)
    with pytest.raises(ConfigError, match=r"tls_cert_file: .*does not exist"):
        web_server_context(missing)
    mismatched = NodeOptions(tls_cert_file=mine.cert, tls_key_file=other.key)
    with pytest.raises(ConfigError, match=r"tls_cert_file: .*does not load"):
        web_server_context(mismatched)
    with pytest.raises(ConfigError, match="web_tls_client_cert: 'optional' needs tls_ca_file"):
        web_server_context(
            NodeOptions(
                tls_cert_file=mine.cert, tls_key_file=mine.key, web_tls_client_cert="optional"
            )
        )
    # DICOM's mutual authentication does not ask browsers for a certificate
    dicom_mutual = NodeOptions(
        tls_cert_file=mine.cert,
        tls_key_file=mine.key,
        tls_ca_file=ca.cert,
        tls_require_client_cert=True,
    )
    assert web_server_context(dicom_mutual).source.context().verify_mode == ssl.CERT_NONE
    optional = dicom_mutual.model_copy(update={"web_tls_client_cert": "optional"})
    assert web_server_context(optional).source.context().verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(ValueError, match="tls_require_client_cert needs tls_ca_file"):
        NodeOptions(tls_cert_file=mine.cert, tls_key_file=mine.key, tls_require_client_cert=True)
