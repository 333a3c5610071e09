"""Destinations in peers.yaml: each kind parsed by ``type``, bad ones refused at load with file,
key and reason, and names resolved the way deliveries use them (peers, references, SOURCE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node.config import load_settings
from pacs_node.destinations import (
    SOURCE,
    BasicAuth,
    BearerAuth,
    DicomWebDestination,
    DimseDestination,
    FhirDestination,
    missing_secrets,
    plain_http_destinations,
    source_name,
)
from pacs_node.dispatch.destinations import Unresolved, resolve
from pacs_node.errors import ConfigError

PEERS = """
peers:
  - {ae_title: CT1, host: 10.0.0.5}
  - {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  - {ae_title: NOHOST, port: 104}
destinations:
  PACS: {type: dimse, peer: ORTHANC, concurrency: 2}
  ARCHIVE: {type: dimse, ae_title: ARCH, host: 10.0.0.9, port: 104}
  WEB:
    type: dicomweb
    url: https://pacs.example/dicom-web/
    auth: {type: basic, username: node, password_env: WEB_PASSWORD}
  EHR:
    type: fhir
    base_url: https://ehr.example/fhir
    auth: {type: bearer, token_env: EHR_TOKEN}
    patient_system: urn:oid:1.2.3
"""


def _load(tmp_path: Path, text: str) -> tuple[Path, object]:
    directory = tmp_path / "cfg"
    directory.mkdir(exist_ok=True)
    path = directory / "peers.yaml"
    path.write_text(text)
    return path, load_settings(directory)


def test_each_kind_is_parsed_by_its_type(tmp_path: Path) -> None:
    _, settings = _load(tmp_path, PEERS)
    destinations = settings.destinations  # type: ignore[attr-defined]
    assert isinstance(destinations["PACS"], DimseDestination)
    assert destinations["PACS"].concurrency == 2
    web = destinations["WEB"]
    assert isinstance(web, DicomWebDestination)
    assert web.url == "https://pacs.example/dicom-web"
    assert isinstance(web.auth, BasicAuth)
    ehr = destinations["EHR"]
    assert isinstance(ehr, FhirDestination)
    assert isinstance(ehr.auth, BearerAuth)
    assert ehr.create_patient is False
    assert ehr.patient_system == "urn:oid:1.2.3"


def test_names_resolve_to_addresses(tmp_path: Path) -> None:
    _, settings = _load(tmp_path, PEERS)
    destinations = settings.destinations  # type: ignore[attr-defined]
    peers = settings.peers  # type: ignore[attr-defined]
    pacs = resolve("PACS", destinations, peers)
    assert isinstance(pacs, DimseDestination)
    assert (pacs.ae_title, pacs.host, pacs.port, pacs.concurrency) == (
        "ORTHANC",
        "127.0.0.1",
        4242,
        2,
    )
    implicit = resolve("ORTHANC", destinations, peers)  # a peer with a port is a destination
    assert isinstance(implicit, DimseDestination)
    assert implicit.port == 4242
    # a sender without a port: its results wait, with the reason
    assert isinstance(resolve(source_name("CT1"), destinations, peers), Unresolved)
    assert isinstance(resolve("NOHOST", destinations, peers), Unresolved)
    assert isinstance(resolve(source_name(None), destinations, peers), Unresolved)
    assert source_name(None) == SOURCE
    unknown = resolve("NOWHERE", destinations, peers)
    assert isinstance(unknown, Unresolved)
    assert "NOWHERE" in unknown.reason


def test_secrets_are_named_not_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, settings = _load(tmp_path, PEERS)
    destinations = settings.destinations  # type: ignore[attr-defined]
    monkeypatch.delenv("WEB_PASSWORD", raising=False)
    monkeypatch.setenv("EHR_TOKEN", "t0ken")
    assert missing_secrets(destinations) == [("WEB", "WEB_PASSWORD")]
    monkeypatch.setenv("WEB_PASSWORD", "pw")
    assert missing_secrets(destinations) == []
    assert destinations["EHR"].auth.headers() == {"Authorization": "Bearer t0ken"}
    assert destinations["WEB"].auth.headers() == {"Authorization": "Basic bm9kZTpwdw=="}


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "destinations:\n  X: {type: smoke}\n",
            "destinations.X",
            "does not match any of the expected tags",
        ),
        (
            "destinations:\n  X: {type: dimse, ae_title: A}\n",
            "destinations.X.dimse",
            "needs peer, or ae_title, host and port",
        ),
        (
            "destinations:\n  X: {type: dimse, ae_title: A, host: h, port: 70000}\n",
            "destinations.X.dimse.port",
            "less than or equal to 65535",
        ),
        (
            "destinations:\n  X: {type: dicomweb, url: 'ftp://x'}\n",
            "destinations.X.dicomweb.url",
            "not an http(s) URL",
        ),
        (
            (
                "destinations:\n  X: {type: fhir, base_url: 'https://e/fhir', auth: {type: bearer, "
                "token: abc}}\n"
            ),
            "destinations.X.fhir.auth.bearer.token_env",  # an inline token is refused
            "Field required",
        ),
        (
            (
                "destinations:\n  X: {type: fhir, base_url: 'https://e', auth: {type: basic, "
                "username: u, password_env: 'not a name'}}\n"
            ),
            "destinations.X.fhir.auth.basic.password_env",
            "not an environment variable name",
        ),
        (
            "destinations:\n  SOURCE: {type: fhir, base_url: 'https://e'}\n",
            "(top level)",
            "reserved",
        ),
        (
            "destinations:\n  X: {type: dimse, peer: GHOST}\n",
            "(top level)",
            "must be in peers with a host and a port",
        ),
        (
            (
                "peers:\n  - {ae_title: P, host: h, port: 104}\n"
                "destinations:\n  P: {type: fhir, base_url: 'https://e'}\n"
            ),
            "(top level)",
            "already a destination",
        ),
        (
            "destinations:\n  X: {type: fhir, base_url: 'http://ehr.example/fhir'}\n",
            "destinations.X.fhir",
            "http:// to ehr.example would send patient data in clear text",
        ),
        (
            "destinations:\n  X: {type: dicomweb, url: 'http://10.1.2.3/dicom-web'}\n",
            "destinations.X.dicomweb",
            "use https:// (or allow_insecure: true)",
        ),
        (  # names that only a resolver following RFC 6761 keeps on this machine
            "destinations:\n  X: {type: dicomweb, url: 'http://pacs.localhost/dicom-web'}\n",
            "destinations.X.dicomweb",
            "use https:// (or allow_insecure: true)",
        ),
        (
            "destinations:\n  X: {type: fhir, base_url: 'http://localhost./fhir'}\n",
            "destinations.X.fhir",
            "use https:// (or allow_insecure: true)",
        ),
        (
            "destinations:\n  X: {type: fhir, base_url: 'https://e', tls_ca_file: /no/ca.pem}\n",
            "destinations.X.fhir.tls_ca_file",
            "Path does not point to a file",
        ),
        (
            "destinations:\n  X: {type: fhir, base_url: 'https://e', tls_cert_file: /etc/hosts}\n",
            "destinations.X.fhir",
            "tls_cert_file and tls_key_file go together",
        ),
    ],
)
def test_bad_destinations_fail_at_load(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert caught.value.source.endswith("peers.yaml")
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_plain_http_only_to_this_machine_or_when_allowed(tmp_path: Path) -> None:
    _, settings = _load(
        tmp_path,
        "destinations:\n"
        "  LOCAL: {type: fhir, base_url: 'http://127.0.0.1:8080/fhir'}\n"
        "  NAMED: {type: dicomweb, url: 'http://localhost/dicom-web'}\n"
        "  V6: {type: dicomweb, url: 'http://[::1]:8042/dicom-web'}\n"
        "  LAB: {type: fhir, base_url: 'http://lab.example/fhir', allow_insecure: true}\n"
        "  SAFE: {type: fhir, base_url: 'https://ehr.example/fhir'}\n",
    )
    destinations = settings.destinations  # type: ignore[attr-defined]
    assert plain_http_destinations(destinations) == ["LOCAL", "NAMED", "V6", "LAB"]
