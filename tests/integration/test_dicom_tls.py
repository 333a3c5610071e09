"""DICOM TLS through the doors a hospital uses: DCMTK's echoscu and storescu against the node's
TLS port with mutual authentication, a plain association and a silent client on that port, a
certificate subject bound to an AE title, /metrics, the in-process SCP with the plain port off,
and the node's C-STORE SCU delivering to a real Orthanc over DICOM TLS. Certificates are made
by the test (tests/certs.py)."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_node.audit.events import Alert, AuditEvent
from pacs_node.catalog.db import open_catalog
from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.destinations import DimseDestination
from pacs_node.dispatch.dimse import CStoreHandler
from pacs_node.dispatch.handler import Delivered, Parcel
from pacs_node.errors import TransientDelivery
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool
from pacs_node.tls import TLSFiles, client_context
from tests.certs import CertificateAuthority, Issued
from tests.conftest import NodeProcess, free_port, wait_for
from tests.dicom_factory import write_series
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.integration

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
HOSPITAL = "O=Test Hospital"
# A silent client is dropped this long after it connects; long enough that it is still
# connected once an echo from another client is answered, on a loaded machine too.
SILENT_TIMEOUT_S = 8.0


def _dcmtk(
    tool: str, node: NodeProcess, port: int, calling: str, *args: str, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-aet", calling, "-aec", node.ae_title, *args, "127.0.0.1", str(port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _tls(client: Issued | None, ca: CertificateAuthority) -> tuple[str, ...]:
    """DCMTK's TLS options: a client certificate, or anonymous TLS; the node's CA trusted."""
    shown = ("+tls", str(client.key), str(client.cert)) if client else ("+tla",)
    return (*shown, "+cf", str(ca.cert))


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_dcmtk_over_tls_with_mutual_authentication(
    tmp_path: Path, make_node: Callable[..., NodeProcess]
) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue("node", f"CN=localhost,{HOSPITAL}", hosts=("127.0.0.1", "localhost"))
    ct1 = ca.issue("ct1", f"CN=CT1,{HOSPITAL}")
    ct2 = ca.issue("ct2", f"CN=CT2,{HOSPITAL}")
    tls_port = free_port()
    node = make_node(
        peers=[
            {"ae_title": "STORESCU", "tls_subject": f"CN=CT1,{HOSPITAL}"},
            {"ae_title": "ECHOSCU"},
        ],
        dicom_tls_port=tls_port,
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
        tls_ca_file=str(ca.cert),
        tls_require_client_cert=True,
        dicom_workers=1,  # TLS served by a worker process
        job_workers=0,
        assoc_request_timeout_s=SILENT_TIMEOUT_S,
    )
    files = write_series(tmp_path / "study", slices=2, rows=16, columns=16)

    # A client that connects and says nothing holds only its own thread, not the port.
    silent = socket.create_connection(("127.0.0.1", tls_port))
    opened = time.monotonic()
    silent.setblocking(False)
    try:
        echo = _dcmtk(ECHOSCU, node, tls_port, "ECHOSCU", *_tls(ct1, ca))
        assert echo.returncode == 0, echo.stderr
        if time.monotonic() - opened < SILENT_TIMEOUT_S - 1:  # else too slow a machine to tell
            assert not _closed(silent)  # answered while the silent client still waits

        stored = _dcmtk(STORESCU, node, tls_port, "STORESCU", *_tls(ct1, ca), files=tuple(files))
        assert stored.returncode == 0, stored.stderr

        # No client certificate: refused in the handshake.
        anonymous = _dcmtk(ECHOSCU, node, tls_port, "ECHOSCU", *_tls(None, ca))
        assert anonymous.returncode != 0
        # A client that does not trust the node's certificate refuses it.
        other = CertificateAuthority.create(tmp_path / "other-pki")
        distrust = _dcmtk(ECHOSCU, node, tls_port, "ECHOSCU", *_tls(ct1, other))
        assert distrust.returncode != 0
        # A plain association on the TLS port: refused, the node goes on.
        plain = _dcmtk(ECHOSCU, node, tls_port, "ECHOSCU")
        assert plain.returncode != 0
        # A trusted certificate, but not the one STORESCU is bound to: A-ASSOCIATE-RJ.
        impostor = _dcmtk(ECHOSCU, node, tls_port, "STORESCU", *_tls(ct2, ca))
        assert impostor.returncode != 0
        assert "Calling AE Title Not Recognized" in impostor.stdout + impostor.stderr

        wait_for(
            lambda: _closed(silent), SILENT_TIMEOUT_S + 20, what="the silent client to be dropped"
        )
    finally:
        silent.close()

    again = _dcmtk(ECHOSCU, node, tls_port, "ECHOSCU", *_tls(ct1, ca))
    assert again.returncode == 0, again.stderr
    studies = wait_for(node.studies, 30, what="the study received over TLS")
    assert studies[0]["instances"] == 2

    log = node.log_text()
    for kind in (
        "tls-certificate-refused",
        "tls-handshake-failed",
        "tls-handshake-timeout",
        "tls-certificate-not-bound",
        "tls-peer-refused-our-certificate",
    ):
        assert re.search(rf"security alert.*{kind}", log), kind
    assert "Traceback" not in log

    metrics = httpx.get(f"http://127.0.0.1:{node.node['web_port']}/metrics", timeout=10).text
    expiry = re.search(
        r'pacs_node_tls_certificate_expiry_timestamp_seconds\{certificate="dicom"\} (\S+)', metrics
    )
    assert expiry is not None
    assert float(expiry.group(1)) == server.not_after.timestamp()
    failures = re.search(r"^pacs_node_tls_handshake_failures_total (\S+)$", metrics, re.M)
    assert failures is not None
    assert float(failures.group(1)) >= 3


def test_in_process_scp_on_the_tls_port_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dicom_workers: 0`` and ``dicom_port: 0``: the TLS port alone, in this process, with
    client certificates optional (verified when shown): the subject a peer is bound to must
    reach the association, and the node's own SCU context connects."""
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue("node", f"CN=localhost,{HOSPITAL}", hosts=("127.0.0.1",))
    client = ca.issue("ws", f"CN=WS,{HOSPITAL}")
    options = NodeOptions(
        data_dir=tmp_path / "var",
        dicom_host="127.0.0.1",
        dicom_port=0,
        dicom_tls_port=free_port(),
        tls_cert_file=server.cert,
        tls_key_file=server.key,
        tls_ca_file=ca.cert,
        dicom_workers=0,
        min_free_mb=0,
        assoc_request_timeout_s=2.0,
    )
    peers = (PeerConfig(ae_title="WS", tls_subject="WS"),)
    catalog = open_catalog(options.catalog_url)
    spool = Spool(options.spool_dir)
    audited: list[AuditEvent | Alert] = []
    scp = StorageSCP(
        Settings(node=options, peers=peers),
        spool,
        CatalogRecorder(catalog, spool),
        catalog,
        auditor=audited.append,
    )
    scp.start()

    def associate(files: TLSFiles | None) -> Association:
        ae = AE(ae_title="WS")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        tls_args = (client_context(files), "127.0.0.1") if files else None
        return ae.associate("127.0.0.1", scp.tls_port, ae_title="PACSNODE", tls_args=tls_args)

    try:
        with pytest.raises(RuntimeError):
            _ = scp.port  # no plain port
        for _ in range(5):  # connections reset (SO_LINGER 0) as they are accepted
            reset = socket.create_connection(("127.0.0.1", scp.tls_port))
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()
        assoc = associate(TLSFiles(client.cert, client.key, ca.cert))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        # TLS without a client certificate: the handshake passes, the bound AE is rejected.
        assert associate(TLSFiles(ca_file=ca.cert)).is_rejected
        started = time.monotonic()
        assert not associate(None).is_established  # plain DICOM on the TLS port
        assert time.monotonic() - started < 5

        def tls_alerts() -> list[tuple[str, str | None]]:
            return [
                (item.detail.split(":")[0], item.address)
                for item in audited
                if isinstance(item, Alert) and item.detail.startswith("tls-")
            ]

        def unbound_then_plain() -> bool:
            # a reset above may fail its handshake first, when the machine is slow to accept
            kinds = [kind for kind, address in tls_alerts() if address == "127.0.0.1"]
            if "tls-certificate-not-bound" not in kinds:
                return False
            return "tls-handshake-failed" in kinds[kinds.index("tls-certificate-not-bound") :]

        wait_for(unbound_then_plain, 15, what="the unbound certificate's and plain DICOM's alerts")
        # audited as Node Authentication (110126), the rejected association among them
        assert {item.kind for item in audited if isinstance(item, Alert)} == {"node-authentication"}

        # A renewed certificate written over the files serves new connections, no restart.
        renewed = ca.issue("renewed", f"CN=localhost,{HOSPITAL}", hosts=("127.0.0.1",))
        server.cert.write_bytes(renewed.cert.read_bytes())
        server.key.write_bytes(renewed.key.read_bytes())
        expected = ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())
        context = client_context(TLSFiles(client.cert, client.key, ca.cert))

        def served() -> bytes | None:
            with (
                socket.create_connection(("127.0.0.1", scp.tls_port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                return tls.getpeercert(binary_form=True)

        wait_for(lambda: served() == expected, 10, what="the renewed certificate")
        assert scp.alive()
    finally:
        scp.stop()
        catalog.dispose()


def test_results_go_to_orthanc_over_dicom_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki")
    orthanc_cert = ca.issue("orthanc", f"CN=localhost,{HOSPITAL}", hosts=("127.0.0.1",))
    node_cert = ca.issue("pacsnode", f"CN=PACSNODE,{HOSPITAL}")
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(orthanc_cert.cert),
            "DicomTlsPrivateKey": str(orthanc_cert.key),
            "DicomTlsTrustedCertificates": str(ca.cert),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    [path] = write_series(tmp_path / "result", slices=1, rows=16, columns=16)
    from pydicom import dcmread

    header = dcmread(path, stop_before_pixels=True)
    parcel = Parcel(
        1,
        "seg",
        str(header.SOPClassUID),
        str(header.SOPInstanceUID),
        {ExplicitVRLittleEndian: path},
    )

    def destination(**tls: object) -> DimseDestination:
        return DimseDestination.model_validate(
            {
                "type": "dimse",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "storage_commitment": False,
                "timeout_s": 10,
                "tls": True,
                "tls_ca_file": ca.cert,
                **tls,
            }
        )

    handler = CStoreHandler("PACSNODE")
    orthanc.start()
    try:
        [outcome] = handler.send(
            destination(tls_cert_file=node_cert.cert, tls_key_file=node_cert.key), [parcel]
        )
        assert isinstance(outcome, Delivered), outcome
        assert orthanc.get("/instances")  # stored
        # Orthanc requires a client certificate: without one the association fails.
        with pytest.raises(TransientDelivery):
            handler.send(destination(), [parcel])
    finally:
        orthanc.stop()
