"""DICOM TLS contexts (PS3.15 B.9 / BCP 195): protocol versions and suites, reload on change,
the previous context kept when a new file is bad, expiry for /metrics, subject binding, and the
settings that turn it on."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from pacs_node.audit.events import Alert
from pacs_node.cli.demo import _node_address
from pacs_node.config import NodeOptions, PeerConfig, Settings, load_settings
from pacs_node.cstore import associate, pair_contexts, tls_failure
from pacs_node.destinations import DimseDestination
from pacs_node.errors import ConfigError
from pacs_node.ingest.access import AccessPolicy, RejectReason
from pacs_node.ingest.limits import Caps, SharedLimits
from pacs_node.ingest.scp import server_tls
from pacs_node.ingest.transport import (
    TLS_HANDSHAKE_COUNTER,
    Guard,
    GuardedServer,
    GuardedTLSSocket,
    Throttle,
    handshake_failure_kind,
    log_security_alert,
)
from pacs_node.ingest.workers import ALERT_BATCH_ENTRIES, _PipeSink
from pacs_node.redact import scrub_reason
from pacs_node.services.metrics import certificate_expiry, certificate_reload_refused
from pacs_node.tls import (
    ReloadingContext,
    Served,
    TLSFileError,
    TLSFiles,
    client_context,
    not_after,
    parse_subject,
    reloading_server_context,
    server_context,
    subject_matches,
)
from tests.certs import CertificateAuthority, Issued
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, Issued, Issued]:
    ca = CertificateAuthority.create(tmp_path_factory.mktemp("pki"))
    server = ca.issue("server", "CN=localhost,O=Test Hospital", hosts=("127.0.0.1", "localhost"))
    client = ca.issue("ct1", "CN=CT1,O=Test Hospital")
    return ca, server, client


def _files(pki: tuple[CertificateAuthority, Issued, Issued]) -> TLSFiles:
    ca, server, _ = pki
    return TLSFiles(server.cert, server.key, ca.cert)


def test_server_context_follows_the_bcp195_profile(
    pki: tuple[CertificateAuthority, Issued, Issued],
) -> None:
    context = server_context(_files(pki), require_client_cert=True)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    ciphers = context.get_ciphers()
    tls12 = [c["name"] for c in ciphers if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(name.startswith("ECDHE-") and "-GCM-" in name for name in tls12)
    assert {c["protocol"] for c in ciphers} == {"TLSv1.2", "TLSv1.3"}
    optional = server_context(_files(pki), require_client_cert=False)
    assert optional.verify_mode is ssl.CERT_OPTIONAL  # a client certificate is checked if shown


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[str | None, tuple[str, str, int] | None]:
    """(version, cipher) the two sides agree on over a socket pair, or an SSLError."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(right, server_hostname="localhost") as tls:
            version, cipher = tls.version(), tls.cipher()
            tls.sendall(b"x")
    finally:
        thread.join(5)
    assert not errors, errors
    return version, cipher


def test_tls12_negotiates_ecdhe_with_aes_gcm_and_tls13_is_preferred(
    pki: tuple[CertificateAuthority, Issued, Issued],
) -> None:
    ca, _, client = pki
    server = server_context(_files(pki), require_client_cert=True)
    ours = client_context(TLSFiles(client.cert, client.key, ca.cert))
    assert _handshake(server, ours)[0] == "TLSv1.3"
    ours.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = _handshake(server, ours)
    assert version == "TLSv1.2"
    assert cipher is not None
    assert cipher[0].startswith("ECDHE-")
    assert "GCM" in cipher[0]
    # A TLS 1.2 client that offers no ECDHE with AES-GCM finds no suite in common.
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.load_verify_locations(ca.cert)
    weak.load_cert_chain(client.cert, client.key)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE+CHACHA20:ECDHE+AES+SHA")
    with pytest.raises(ssl.SSLError):
        _handshake(server, weak)


def test_missing_or_bad_files_name_their_key(
    pki: tuple[CertificateAuthority, Issued, Issued], tmp_path: Path
) -> None:
    ca, server, _ = pki
    with pytest.raises(TLSFileError) as missing:
        server_context(TLSFiles(tmp_path / "none.pem", server.key, ca.cert), True)
    assert missing.value.key == "tls_cert_file"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(TLSFileError) as bad_ca:
        server_context(TLSFiles(server.cert, server.key, garbage), True)
    assert bad_ca.value.key == "tls_ca_file"
    with pytest.raises(TLSFileError) as wrong_key:
        client_context(TLSFiles(server.cert, garbage, ca.cert), prefix="destinations.PACS.")
    assert wrong_key.value.key == "destinations.PACS.tls_cert_file"
    # At start the same is a ConfigError naming node.yaml's key.
    options = NodeOptions(
        dicom_tls_port=2762, tls_cert_file=server.cert, tls_key_file=garbage, tls_ca_file=ca.cert
    )
    with pytest.raises(ConfigError) as error:
        server_tls(Settings(node=options, config_dir=tmp_path))
    assert "tls_cert_file" in str(error.value)
    assert "node.yaml" in str(error.value)


def test_a_renewed_certificate_is_used_and_a_bad_one_is_not(
    pki: tuple[CertificateAuthority, Issued, Issued],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca, server, _ = pki
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(server.cert.read_bytes())
    key.write_bytes(server.key.read_bytes())
    files = TLSFiles(cert, key, ca.cert)
    source = ReloadingContext(
        lambda: server_context(files, True), files.paths(), check_every_s=0, files=files
    )
    first = source.context()
    assert source.served().cert_not_after == server.not_after
    assert source.context() is first  # unchanged files: the same context
    renewed = ca.issue("renewed", "CN=localhost,O=Test Hospital", days=20)
    cert.write_bytes(renewed.cert.read_bytes())
    key.write_bytes(renewed.key.read_bytes())
    os.utime(cert, ns=(2_000_000_000, 2_000_000_000))  # as a later write would
    second = source.context()
    assert second is not first
    assert source.served() == Served(renewed.not_after, not_after(ca.cert), refused=False)
    # A certificate whose key is not the one beside it: refused, the renewed one still served
    # and its expiry still the one reported.
    cert.write_bytes(server.cert.read_bytes())
    os.utime(cert, ns=(2_500_000_000, 2_500_000_000))
    with caplog.at_level(logging.WARNING, logger="pacs_node.tls"):
        assert source.served() == Served(renewed.not_after, not_after(ca.cert), refused=True)
    assert source.context() is second
    cert.write_text("half-written")
    os.utime(cert, ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="pacs_node.tls"):
        assert source.context() is second  # the bad file leaves the context in use
        assert source.context() is second
    warnings = [r for r in caplog.records if "do not load" in r.getMessage()]
    assert len(warnings) == 2  # once per new version of the files
    cert.write_bytes(renewed.cert.read_bytes())
    os.utime(cert, ns=(3_000_000_000, 3_000_000_000))
    assert source.context() is not second  # fixed again: reloaded


def test_expiry_for_metrics(pki: tuple[CertificateAuthority, Issued, Issued]) -> None:
    ca, server, client = pki
    assert not_after(server.cert) == server.not_after
    settings = Settings(
        node=NodeOptions(
            dicom_tls_port=2762,
            tls_cert_file=server.cert,
            tls_key_file=server.key,
            tls_ca_file=ca.cert,
        ),
        destinations={
            "PACS": DimseDestination(
                type="dimse",
                ae_title="PACS",
                host="127.0.0.1",
                port=104,
                tls=True,
                tls_ca_file=ca.cert,
                tls_cert_file=client.cert,
                tls_key_file=client.key,
            )
        },
    )
    expiry = certificate_expiry(settings)
    assert expiry["dicom"] == server.not_after.timestamp()
    assert expiry["destination:PACS"] == client.not_after.timestamp()
    assert set(expiry) == {"dicom", "dicom_ca", "destination:PACS", "destination_ca:PACS"}
    assert certificate_expiry(Settings(node=NodeOptions())) == {}
    assert certificate_reload_refused(settings) == {"dicom": 0, "destination:PACS": 0}


def test_metrics_report_the_certificate_served_not_the_refused_file(
    pki: tuple[CertificateAuthority, Issued, Issued], tmp_path: Path
) -> None:
    ca, server, _ = pki
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    cert.write_bytes(server.cert.read_bytes())
    key.write_bytes(server.key.read_bytes())
    options = NodeOptions(
        dicom_tls_port=2762, tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca.cert
    )
    settings = Settings(node=options)
    assert server_tls(settings) is not None  # what the SCP serves
    assert certificate_expiry(settings)["dicom"] == server.not_after.timestamp()
    # A renewed certificate written without its new key: refused, the old one still serves.
    renewed = ca.issue("renewed-alone", "CN=localhost,O=Test Hospital", days=25)
    cert.write_bytes(renewed.cert.read_bytes())
    os.utime(cert, ns=(2_000_000_000, 2_000_000_000))
    wait_for(lambda: certificate_reload_refused(settings) == {"dicom": 1}, 5, what="the refusal")
    assert certificate_expiry(settings)["dicom"] == server.not_after.timestamp()
    assert not_after(cert) == renewed.not_after  # what the file on disk says


def test_subject_binding() -> None:
    subject = "CN=CT1,O=Test Hospital"
    assert subject_matches("O=Test Hospital,CN=CT1", subject)  # any order
    assert subject_matches("CT1", subject)  # the common name alone
    assert not subject_matches("CN=CT1,O=Other", subject)
    assert not subject_matches("CN=CT1", subject)  # a DN must match whole
    assert not subject_matches("CT2", subject)
    assert not subject_matches("CT1", None)
    # Values without regard to case, spaces after commas, names in any case.
    assert subject_matches("cn=ct1, o=TEST HOSPITAL", subject)
    assert subject_matches("ct1", subject)
    assert not subject_matches("CT1", "CN=CT1,CN=CT2,O=Test Hospital")  # which CN is it?
    with_email = "2.5.4.5=0042,1.2.840.113549.1.9.1=ct1@hospital.test,CN=CT1"  # as shown
    assert subject_matches("CN=CT1, emailAddress=CT1@hospital.test, serialNumber=0042", with_email)
    assert not subject_matches(
        "CN=CT1,emailAddress=ct2@hospital.test,serialNumber=0042", with_email
    )
    for bad, why in (
        ("CN=CT1,Surname=X", "unknown attribute 'SURNAME'"),
        ("CN=CT1,,O=X", "is not NAME=VALUE"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_subject(bad)
    policy = AccessPolicy(
        Settings(
            node=NodeOptions(ae_title="NODE", promiscuous=True),
            peers=(PeerConfig(ae_title="CT1", tls_subject="CN=CT1,O=Test Hospital"),),
        )
    )
    assert policy.check("CT1", "NODE", "10.0.0.1", subject) is None
    for shown in (None, "CN=CT2,O=Test Hospital"):
        rejection = policy.check("CT1", "NODE", "10.0.0.1", shown)
        assert rejection is not None
        assert rejection.certificate
        assert rejection.reason is RejectReason.CALLING_AE_NOT_RECOGNIZED
    assert policy.check("OTHER", "NODE", "10.0.0.1", None) is None  # promiscuous, not bound
    with pytest.raises(ValidationError, match="is not NAME=VALUE"):
        PeerConfig(ae_title="CT1", tls_subject="CN=CT1,=broken")


def test_tls_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="no DICOM port is open"):
        NodeOptions(dicom_port=0)
    with pytest.raises(ValidationError, match="needs tls_cert_file"):
        NodeOptions(dicom_tls_port=2762)
    with pytest.raises(ValidationError, match="needs tls_ca_file"):
        NodeOptions(tls_require_client_cert=True)
    with pytest.raises(ValidationError, match="need tls: true"):
        DimseDestination(type="dimse", peer="PACS", tls_ca_file=Path("ca.pem"))
    with pytest.raises(ValidationError, match="both"):
        DimseDestination(type="dimse", peer="PACS", tls=True, tls_cert_file=Path("c.pem"))
    for name, value in {
        "DICOM_PORT": "0",
        "DICOM_TLS_PORT": "2762",
        "TLS_CERT_FILE": "node.pem",
        "TLS_KEY_FILE": "node.key",
        "TLS_CA_FILE": "ca.pem",
        "TLS_REQUIRE_CLIENT_CERT": "true",
    }.items():
        monkeypatch.setenv(f"PACS_NODE_{name}", value)
    monkeypatch.chdir(tmp_path)
    options = load_settings(tmp_path).node
    assert (options.dicom_port, options.dicom_tls_port) == (0, 2762)
    assert options.tls_cert_file == tmp_path / "node.pem"  # made absolute at start
    assert options.tls_ca_file == tmp_path / "ca.pem"
    assert options.tls_require_client_cert is True
    destination = DimseDestination(
        type="dimse", peer="PACS", tls=True, tls_ca_file=Path("pacs-ca.pem")
    )
    assert destination.tls_ca_file == tmp_path / "pacs-ca.pem"  # made absolute too
    # The demo sends plain DICOM: with the plain port off it says so, not "port 0".
    with pytest.raises(ValueError, match="dicom_port: 0"):
        _node_address(Settings(node=options), None)
    assert _node_address(Settings(node=options), "NODE@127.0.0.1:104").port == 104
    monkeypatch.setenv("PACS_NODE_DICOM_TLS_PORT", "0")
    with pytest.raises(ConfigError, match="no DICOM port is open"):
        load_settings(tmp_path)


def _reset(address: tuple[str, int]) -> None:
    """Connect and close with a TCP reset (SO_LINGER 0), before the server accepts."""
    client = socket.create_connection(address)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_a_connection_reset_before_accept_leaves_the_tls_port_serving(
    pki: tuple[CertificateAuthority, Issued, Issued],
) -> None:
    """Python's SSLSocket reads from a wrapped connection that is already reset; anything but
    an OSError from get_request would end socketserver's serve_forever (the port, for good)."""
    listening = socket.create_server(("127.0.0.1", 0))
    server = GuardedServer.__new__(GuardedServer)
    server.socket = listening
    server.ssl_context = None
    server.tls = reloading_server_context(_files(pki), require_client_cert=False)
    try:
        _reset(listening.getsockname())
        with pytest.raises(ConnectionResetError):  # socketserver skips the connection
            server.get_request()
        with socket.create_connection(listening.getsockname()):
            accepted, _ = server.get_request()
        assert isinstance(accepted, GuardedTLSSocket)
        assert accepted.recv(1) == b""  # not guarded yet: a plain read (the peer closed)
        accepted.close()
    finally:
        listening.close()


ECHO = pair_contexts([("1.2.840.10008.1.1", "1.2.840.10008.1.2.1")])


def test_a_silent_tls_peer_fails_the_association_within_its_timeout(
    pki: tuple[CertificateAuthority, Issued, Issued],
) -> None:
    """A destination that accepts the connection and never answers the ClientHello."""
    ca, _, _ = pki
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(10)
    port = listening.getsockname()[1]
    outcome: list[bool] = []

    def send() -> None:
        context = client_context(TLSFiles(ca_file=ca.cert))
        assoc = associate("NODE", "PACS", "127.0.0.1", port, ECHO, timeout_s=0.5, tls=context)
        outcome.append(assoc.is_established)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    accepted, _ = listening.accept()
    try:
        thread.join(10)
        assert outcome == [False]
    finally:
        accepted.close()
        listening.close()
        thread.join(5)


def test_a_peer_bound_to_a_subject_needs_the_tls_port_and_its_ca(tmp_path: Path) -> None:
    (tmp_path / "peers.yaml").write_text(
        "peers:\n  - ae_title: ECHO\n  - ae_title: CT1\n    tls_subject: CN=CT1\n"
    )
    with pytest.raises(ConfigError, match=r"peers\.yaml.*peers\[1\]\.tls_subject.*dicom_tls_port"):
        load_settings(tmp_path)
    (tmp_path / "node.yaml").write_text(
        "dicom_tls_port: 2762\ntls_cert_file: node.pem\ntls_key_file: node.key\n"
    )
    with pytest.raises(ConfigError, match="tls_ca_file"):
        load_settings(tmp_path)
    with (tmp_path / "node.yaml").open("a") as node_yaml:
        node_yaml.write("tls_ca_file: ca.pem\n")
    assert load_settings(tmp_path).peers[1].tls_subject == "CN=CT1"


def test_handshake_failures_by_kind() -> None:
    assert handshake_failure_kind("TLSV1_ALERT_UNKNOWN_CA") == "tls-peer-refused-our-certificate"
    assert (
        handshake_failure_kind("SSLV3_ALERT_BAD_CERTIFICATE") == "tls-peer-refused-our-certificate"
    )
    assert handshake_failure_kind("PEER_DID_NOT_RETURN_A_CERTIFICATE") == "tls-certificate-refused"
    assert handshake_failure_kind("CERTIFICATE_VERIFY_FAILED") == "tls-certificate-refused"
    assert handshake_failure_kind("WRONG_VERSION_NUMBER") == "tls-handshake-failed"


def test_a_connection_evicted_mid_handshake_is_reported(
    pki: tuple[CertificateAuthority, Issued, Issued], tmp_path: Path
) -> None:
    counted: list[str] = []
    alerts: list[tuple[str, str, str]] = []
    caps = Caps(pending_total=4, pending_per_address=4, established_total=4, established_per_peer=4)
    guard = Guard(
        limits=SharedLimits.create(caps, rows=1),
        pending=SharedLimits.create(caps, rows=1),
        count=counted.append,
        request_bytes=1024,
        data_bytes=1024,
        request_timeout_s=5.0,
        read_timeout_s=5.0,
        incoming=tmp_path,
        max_instance_bytes=1000,
        throttle=Throttle(),
        alert=lambda *alert: alerts.append(alert),
    )
    context = server_context(_files(pki), require_client_cert=False)
    context.sslsocket_class = GuardedTLSSocket
    ours, peer = socket.socketpair()
    wrapped = context.wrap_socket(ours, server_side=True, do_handshake_on_connect=False)
    assert isinstance(wrapped, GuardedTLSSocket)
    lease = guard.pending.take_pending("127.0.0.1")
    assert lease is not None
    wrapped.start_guard(guard, "127.0.0.1", lease)
    try:
        wrapped.evict()  # a newer connection needed its place
        assert not wrapped.handshake()
        assert alerts == [
            ("tls-handshake-evicted", "127.0.0.1", "closed to make room for a newer connection")
        ]
        assert TLS_HANDSHAKE_COUNTER not in counted  # counted as an idle connection closed
        assert guard.pending.pending() == 0
    finally:
        wrapped.close()
        peer.close()


def test_the_default_alert_hook_logs_a_flood_as_few_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="pacs_node.ingest.transport"):
        for _ in range(200):
            log_security_alert("tls-test-flood", "10.0.0.9", "WRONG_VERSION_NUMBER")
        log_security_alert("tls-test-other", "10.0.0.9", "HTTP_REQUEST")
    kinds = [getattr(r, "kind", None) for r in caplog.records if r.getMessage() == "security alert"]
    assert kinds == ["tls-test-flood", "tls-test-other"]


def test_a_worker_sends_alerts_in_batches() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    sink = _PipeSink(writer)
    for n in range(500):
        sink.audit(Alert("tls-handshake-failed", f"10.0.{n % 2}.1", "WRONG_VERSION_NUMBER"))
        sink.count(TLS_HANDSHAKE_COUNTER)
    for n in range(ALERT_BATCH_ENTRIES + 10):
        sink.audit(Alert("tls-handshake-timeout", f"10.1.{n}.1", "no handshake"))
    sink.flush()
    messages = []
    while reader.poll(0.5):
        messages.append(reader.recv()[1:])
    assert len(messages) == 2
    [(_, alerts), counted] = messages
    times = {(alert.kind, alert.address): n for alert, n in alerts}
    assert times[("tls-handshake-failed", "10.0.0.1")] == 250
    assert times[("tls-handshake-timeout", "(other addresses)")] == 12
    assert len(alerts) == ALERT_BATCH_ENTRIES + 1
    assert counted == ("count", (TLS_HANDSHAKE_COUNTER, 500))
    sink.flush()
    assert not reader.poll(0.1)  # nothing left to send


def test_a_sender_says_why_its_tls_handshake_failed(
    pki: tuple[CertificateAuthority, Issued, Issued], tmp_path: Path
) -> None:
    ca, server, _ = pki
    elsewhere = ca.issue("elsewhere", "CN=elsewhere,O=Test Hospital", hosts=("elsewhere.test",))
    stranger = CertificateAuthority.create(tmp_path / "stranger")
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(10)
    port = listening.getsockname()[1]

    def serve(files: TLSFiles) -> threading.Thread:
        context = server_context(files, require_client_cert=False)

        def answer() -> None:
            accepted, _ = listening.accept()
            with contextlib.suppress(OSError), context.wrap_socket(accepted, server_side=True):
                pass
            accepted.close()

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        return thread

    cases = (
        (TLSFiles(server.cert, server.key, ca.cert), stranger.cert, "not trusted (unknown CA)"),
        (TLSFiles(elsewhere.cert, elsewhere.key, ca.cert), ca.cert, "host name mismatch"),
    )
    try:
        for files, trusted, why in cases:
            thread = serve(files)
            context = client_context(TLSFiles(ca_file=trusted))
            assoc = associate("NODE", "PACS", "127.0.0.1", port, ECHO, timeout_s=5, tls=context)
            thread.join(5)
            assert not assoc.is_established
            failure = tls_failure(assoc)
            assert failure == f"TLS certificate failure: certificate {why}".replace(
                "certificate host", "host"
            )
            assert scrub_reason(f"PACS@127.0.0.1:{port}: {failure}") == (
                f"PACS@127.0.0.1:{port}: {failure}"
            )
    finally:
        listening.close()


def _refusal(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """Why the server side refused a handshake (whatever the client saw of it), in lower case;
    empty when it did not."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        contextlib.suppress(ssl.SSLError, OSError),
        client.wrap_socket(right, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"x")
        tls.recv(1)
    right.close()
    thread.join(5)
    return " ".join(str(e) for e in errors).lower()


def test_a_revoked_client_certificate_is_refused(
    pki: tuple[CertificateAuthority, Issued, Issued], tmp_path: Path
) -> None:
    ca, server, client = pki
    revoked = ca.issue("revoked", "CN=CT9,O=Test Hospital")
    crl = ca.crl(tmp_path / "ca.crl", revoked=(revoked,))
    files = TLSFiles(server.cert, server.key, ca.cert, crl)
    source = ReloadingContext(
        lambda: server_context(files, True), files.paths(), check_every_s=0, files=files
    )
    good = client_context(TLSFiles(client.cert, client.key, ca.cert))
    bad = client_context(TLSFiles(revoked.cert, revoked.key, ca.cert))
    assert _handshake(source.context(), good)[0] == "TLSv1.3"
    assert "revoked" in _refusal(source.context(), bad)
    # A new CRL on disk is used by the next connection, without a restart.
    ca.crl(crl, revoked=(revoked, client))
    os.utime(crl, ns=(2_000_000_000, 2_000_000_000))
    assert "revoked" in _refusal(source.context(), good)
    garbage = tmp_path / "garbage.crl"
    garbage.write_text("not a CRL")
    with pytest.raises(TLSFileError) as error:
        server_context(TLSFiles(server.cert, server.key, ca.cert, garbage), True)
    assert error.value.key == "tls_crl_file"
    with pytest.raises(ValidationError, match="tls_crl_file needs tls_ca_file"):
        NodeOptions(tls_crl_file=crl)
