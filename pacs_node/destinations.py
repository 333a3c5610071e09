"""Where results go: the ``destinations:`` of ``peers.yaml``, one pydantic model per kind.

::

    destinations:
      PACS:                          # the name routes.yaml uses
        type: dimse                  # C-STORE SCU
        peer: ORTHANC                # a peer of peers: with host and port ...
      ARCHIVE:
        type: dimse
        ae_title: ARCHIVE            # ... or the address itself
        host: 10.20.0.9
        port: 104
        concurrency: 2               # associations at once (default 1)
        tls: true                    # DICOM TLS (PS3.15 B.9): the peer's certificate is
        tls_ca_file: /etc/pacs-node/pacs-ca.pem   # checked against this CA and the host name,
        tls_cert_file: /etc/pacs-node/node.pem    # and this client certificate is shown
        tls_key_file: /etc/pacs-node/node.key     # (both optional)
      WEB:
        type: dicomweb               # STOW-RS
        url: https://pacs.example/dicom-web
        auth: {type: basic, username: node, password_env: PACS_WEB_PASSWORD}
      EHR:
        type: fhir                   # transaction Bundle POST
        base_url: https://ehr.example/fhir
        auth: {type: bearer, token_env: EHR_TOKEN}
        tls_ca_file: /etc/pacs-node/hospital-ca.pem   # else the system's trust store
        tls_cert_file: /etc/pacs-node/node.pem        # a client certificate, when asked for
        tls_key_file: /etc/pacs-node/node.key
        patient_system: urn:oid:1.2.3.4   # identifier system of PatientID
        create_patient: false        # test systems only

Every peer with a ``port`` is also a ``dimse`` destination named by its AE title; ``SOURCE`` in
a route means the AE that sent the study. Secrets are never written in the file: ``*_env`` names
an environment variable, read when the node starts. The kind is chosen by ``type`` (a
discriminated union), so a wrong key is reported against the kind it belongs to.

HTTP destinations (``dicomweb``, ``fhir``) speak TLS 1.2 or 1.3 (TLS 1.2 with ECDHE and AES-GCM
only) and verify the server against ``tls_ca_file``, or the system's trust store. A plain
``http://`` URL is refused when the file is loaded, unless its host is the loopback (this
machine: the node warns once at start) or the destination says ``allow_insecure: true``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    field_validator,
    model_validator,
)

from pacs_node.aetitle import check_ae_title
from pacs_node.tls import TLSFiles

SOURCE = "SOURCE"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_env_name(value: str) -> str:
    if not _ENV.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name")
    return value


def _check_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


EnvName = Annotated[str, AfterValidator(_check_env_name)]
Url = Annotated[str, AfterValidator(_check_url)]
AETitle = Annotated[str, AfterValidator(check_ae_title)]


class NoAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none"] = "none"

    def headers(self) -> dict[str, str]:
        return {}

    def secret_names(self) -> tuple[str, ...]:
        return ()


class BasicAuth(BaseModel):
    """HTTP basic; the password comes from the environment variable ``password_env``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password_env: EnvName

    def headers(self) -> dict[str, str]:
        import base64

        pair = f"{self.username}:{os.environ.get(self.password_env, '')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}

    def secret_names(self) -> tuple[str, ...]:
        return (self.password_env,)


class BearerAuth(BaseModel):
    """A bearer token from the environment variable ``token_env``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bearer"]
    token_env: EnvName

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {os.environ.get(self.token_env, '')}"}

    def secret_names(self) -> tuple[str, ...]:
        return (self.token_env,)


Auth = Annotated[NoAuth | BasicAuth | BearerAuth, Field(discriminator="type")]


class DimseDestination(BaseModel):
    """A C-STORE SCP: a ``peer`` of peers.yaml, or ``ae_title`` + ``host`` + ``port``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dimse"]
    peer: AETitle | None = None
    ae_title: AETitle | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    concurrency: int = Field(default=1, ge=1, le=16)
    timeout_s: float = Field(default=60.0, gt=0)
    # Ask for Storage Commitment when the peer offers it, and wait this long for its report on
    # the same association; false: the C-STORE success alone confirms a delivery.
    storage_commitment: bool = True
    commitment_wait_s: float = Field(default=5.0, gt=0, le=600)
    # DICOM TLS: the peer's certificate checked against tls_ca_file (the system's CAs when
    # unset) and its host name; tls_cert_file and tls_key_file: the node's client certificate.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _absolute_file(cls, value: Path | None) -> Path | None:
        """Read again when they change: fixed at start, not by a later working directory."""
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _tls(self) -> DimseDestination:
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if not self.tls and any(f is not None for f in files):
            raise ValueError("tls_ca_file, tls_cert_file and tls_key_file need tls: true")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        return self

    @model_validator(mode="after")
    def _address(self) -> DimseDestination:
        direct = (self.ae_title, self.host, self.port)
        if self.peer is not None:
            if any(v is not None for v in direct):
                raise ValueError("give either peer or ae_title/host/port, not both")
        elif any(v is None for v in direct):
            raise ValueError("a dimse destination needs peer, or ae_title, host and port")
        return self

    def tls_files(self) -> TLSFiles:
        return TLSFiles(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)

    def secret_names(self) -> tuple[str, ...]:
        return ()


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: the literal name ``localhost`` or a loopback
    address. Other names (``x.localhost``, ``localhost.``) would trust the resolver to follow
    RFC 6761, so they count as remote."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HttpTls(BaseModel):
    """TLS settings of an HTTP destination (``url`` or ``base_url`` is :meth:`address`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tls_ca_file: FilePath | None = None  # CA bundle the server must chain to
    tls_cert_file: FilePath | None = None  # client certificate (PEM), with tls_key_file
    tls_key_file: FilePath | None = None
    allow_insecure: bool = False  # plain http:// to a host other than this machine

    def address(self) -> str:
        raise NotImplementedError

    def plain_http(self) -> bool:
        return urlsplit(self.address()).scheme == "http"

    def tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        return self.tls_ca_file, self.tls_cert_file, self.tls_key_file

    @model_validator(mode="after")
    def _transport(self) -> HttpTls:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        host = urlsplit(self.address()).hostname or ""
        if self.plain_http() and not self.allow_insecure and not is_loopback(host):
            raise ValueError(
                f"http:// to {host} would send patient data in clear text: use https:// "
                "(or allow_insecure: true)"
            )
        return self


class DicomWebDestination(HttpTls):
    """A STOW-RS service: ``url`` is the DICOMweb root (``.../studies`` is appended)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dicomweb"]
    url: Url
    auth: Auth = NoAuth()
    concurrency: int = Field(default=1, ge=1, le=16)
    timeout_s: float = Field(default=60.0, gt=0)

    def address(self) -> str:
        return self.url

    def secret_names(self) -> tuple[str, ...]:
        return self.auth.secret_names()


class FhirDestination(HttpTls):
    """A FHIR R4 server taking transaction Bundles; the patient must already exist there
    unless ``create_patient`` (test systems only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["fhir"]
    base_url: Url
    auth: Auth = NoAuth()
    patient_system: str | None = None  # identifier system of PatientID; default: the results'
    issuer_systems: dict[str, str] = Field(default_factory=dict)  # IssuerOfPatientID -> system
    accession_system: str | None = None
    create_patient: bool = False
    concurrency: int = Field(default=1, ge=1, le=16)
    timeout_s: float = Field(default=60.0, gt=0)

    def address(self) -> str:
        return self.base_url

    def secret_names(self) -> tuple[str, ...]:
        return self.auth.secret_names()


Destination = Annotated[
    DimseDestination | DicomWebDestination | FhirDestination, Field(discriminator="type")
]
AnyDestination = DimseDestination | DicomWebDestination | FhirDestination


def check_destination_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"destination name {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if name == SOURCE:
        raise ValueError(f"{SOURCE} is reserved: it means the AE that sent the study")
    return name


def missing_secrets(destinations: dict[str, AnyDestination]) -> list[tuple[str, str]]:
    """(destination, environment variable) for every secret not set in the environment."""
    return [
        (name, env)
        for name, dest in destinations.items()
        for env in dest.secret_names()
        if not os.environ.get(env)
    ]


def plain_http_destinations(destinations: dict[str, AnyDestination]) -> list[str]:
    """The destinations reached by plain ``http://`` (on this machine, or allowed insecure)."""
    return [
        name
        for name, dest in destinations.items()
        if isinstance(dest, HttpTls) and dest.plain_http()
    ]


def source_name(calling_ae: str | None) -> str:
    """What ``SOURCE`` stands for in a delivery row: the sender's AE title when known."""
    return calling_ae.strip() if calling_ae and calling_ae.strip() else SOURCE
