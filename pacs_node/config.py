"""One typed, frozen settings tree built at start from ``ae_config/*.yaml``, env and CLI.

Precedence: command-line options > ``PACS_NODE_*`` environment variables > files > embedded
defaults. Each file is validated on its own first, so a bad value is reported with the file, the
key and the reason; nothing reads configuration after start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pacs_node.aetitle import check_ae_title
from pacs_node.destinations import (
    AnyDestination,
    Destination,
    DimseDestination,
    check_destination_name,
)
from pacs_node.errors import ConfigError
from pacs_node.routing.rules import RoutesFile
from pacs_node.tls import parse_subject

ENV_PREFIX = "PACS_NODE_"
CONFIG_DIR_ENV = "PACS_NODE_CONFIG_DIR"
NODE_FILE = "node.yaml"
PEERS_FILE = "peers.yaml"
ROUTES_FILE = "routes.yaml"

_M = TypeVar("_M", bound=BaseModel)
_SHA256 = re.compile(r"[0-9a-f]{64}")
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")


class NodeOptions(BaseModel):
    """The node's own options (``node.yaml``); each one also has a flat ``PACS_NODE_*`` name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = "PACSNODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=0, le=65535)  # 0: no plain DICOM port
    # DICOM over TLS (PS3.15 B.9, BCP 195): the SCP's TLS port (0: none), its certificate and
    # key, the CA that client certificates must chain to, and whether a client must show one.
    dicom_tls_port: int = Field(default=0, ge=0, le=65535)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = False
    # A CRL (PEM) from the CA: a revoked client certificate is refused; then every client
    # certificate's issuer needs its CRL in this file. Reloaded on change.
    tls_crl_file: Path | None = None
    web_host: str = "0.0.0.0"
    web_port: int = Field(default=8080, ge=0, le=65535)  # 0: no web face
    data_dir: Path = Path("./var")
    database_url: str | None = None
    quiet_period_s: float = Field(default=30.0, gt=0)
    max_wait_s: float = Field(default=600.0, gt=0)
    # Modality Performed Procedure Step SCP: a study whose steps are all COMPLETED, with every
    # instance they list received, is stable at once; the quiet period stays the fallback.
    # Off by default: a step's N-SET ends a study early, so only AEs trusted with that (``mpps``
    # in peers.yaml) are heard.
    mpps: bool = False
    # Steps one calling AE may have IN PROGRESS at once; another N-CREATE gets 0x0213.
    mpps_max_open_steps: int = Field(default=1000, ge=1, le=1_000_000)
    # A step whose study never came goes after this long, one never ended after max_wait_s more.
    mpps_retention_days: float = Field(default=7.0, gt=0)
    promiscuous: bool = False
    # Established associations at once, node-wide (every SCP worker process together).
    max_associations: int = Field(default=32, ge=1, le=1000)
    # Established associations at once from one peer (calling AE title and address).
    max_associations_per_peer: int = Field(default=16, ge=1, le=1000)
    # Seconds a new connection has to deliver its whole A-ASSOCIATE-RQ; then it is closed.
    assoc_request_timeout_s: float = Field(default=5.0, gt=0)
    # Connections still awaiting their A-ASSOCIATE-RQ, per source address (IPv6: per /64) and in
    # all, per SCP worker process; at the limit the oldest such connection makes room.
    max_pending_per_address: int = Field(default=16, ge=1, le=10_000)
    max_pending_connections: int = Field(default=128, ge=1, le=100_000)
    # Largest A-ASSOCIATE-RQ read (PS3.8 sets none; User Identity assertions can be large).
    max_assoc_request_bytes: int = Field(default=1_048_576, ge=1024, le=2**31)
    # Largest data set taken in one C-STORE; a larger one gets Out of Resources (0xA700).
    max_instance_mb: int = Field(default=4096, ge=1, le=2**20)
    # Storage SCP processes sharing the DICOM port (0: one process, threads only). More than one
    # lets several associations use several cores; the catalog stays in the main process.
    dicom_workers: int = Field(default=2, ge=0, le=64)
    max_pdu_bytes: int = Field(default=262_144, ge=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    fsync: bool = True
    min_free_mb: int = Field(default=256, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # The same logger and message at WARNING or above is written at most this many times per
    # window (0: no limit), then one "suppressed K similar" line.
    log_repeat_limit: int = Field(default=10, ge=0)
    log_repeat_window_s: float = Field(default=60.0, gt=0)
    # Libraries allowed to log below WARNING (pynetdicom, httpx, ...): diagnosis only, they
    # write request URLs and data sets, which hold patient data.
    log_verbose_libraries: Annotated[tuple[str, ...], NoDecode] = ()
    # model bundles, one folder each (MONAI bundle layout); made absolute when read
    models_dir: Path = Field(default=Path("./models"), validate_default=True)
    # SHA-256 of each bundle allowed to run (`pacs-node models --json` prints them); a bundle
    # not listed stops the node at start. Empty: any bundle under models_dir runs.
    model_sha256_allowlist: Annotated[tuple[str, ...], NoDecode] = ()
    # CPU threads for inference in each job worker; 0: the worker's share of the usable cores
    # (affinity and cgroup quota) so the workers together never run more threads than cores.
    torch_threads: int = Field(default=0, ge=0, le=1024)
    # Job worker processes (inference beside the SCP), 0 runs none; None ("auto", the default):
    # min(2, usable cores // 2, MemAvailable // 1.5 GiB), at least 1 (pacs_node.cpus.job_workers):
    # each worker gets two cores for its model; each holds its models (~0.9 GB for
    # ct-torso-organs).
    job_workers: int | None = Field(default=None, ge=0, le=32)
    job_max_attempts: int = Field(default=3, ge=1, le=100)  # a job that kills its worker
    # Who runs the jobs: this node's worker processes (local), or `pacs-node worker` processes
    # on any host taking them from a Celery broker (celery, with broker_url): see pacs_node.jobs.
    job_queue: Literal["local", "celery"] = "local"
    # The broker of job_queue: celery: redis://, rediss://, amqp://, amqps:// (RabbitMQ).
    broker_url: str = Field(default="", max_length=2000, validate_default=True)
    # Broker queues are named <job_queue_prefix><device class> (cpu, gpu, ...), so node groups
    # sharing one broker do not take each other's jobs.
    job_queue_prefix: str = Field(
        default="pacs-node.", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$"
    )
    # A job claimed by a Celery worker holds a lease this long, renewed every third of it while it
    # runs; an expired lease (the worker was killed) puts the job back in the queue.
    job_lease_s: float = Field(default=120.0, ge=1, le=86_400)
    # The slowest job expected: the broker redelivers a task taken but not acknowledged only after
    # twice this (Redis's visibility timeout, RabbitMQ's consumer timeout), never mid-job.
    job_timeout_s: float = Field(default=3600.0, ge=10, le=7 * 86_400)
    # A graceful stop's bound (SIGTERM, SIGINT): associations get half of it to finish, a job in
    # progress most of it (then its worker is killed and the job re-queued); past it the node
    # kills its processes and exits 128 + signal. A supervisor's own bound must be longer.
    stop_timeout_s: float = Field(default=30.0, ge=2, le=3600)
    delivery_max_attempts: int = Field(default=12, ge=1, le=1000)  # then dead letter
    delivery_backoff_s: float = Field(default=5.0, gt=0)  # first retry delay, doubled each time
    delivery_backoff_max_s: float = Field(default=900.0, gt=0)
    # How long an outbox claim ('sending') holds without renewal; the holder renews it while it
    # sends, so an expired one belongs to a process that died or could not settle: taken back.
    delivery_lease_s: float = Field(default=300.0, ge=5, le=86_400)
    # This node's name in the claims it makes on a shared catalog (empty: host name + data dir);
    # at start a node takes back the claims of its own earlier processes.
    node_id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    # Several nodes on one catalog: one of them at a time owns the assembly timers and
    # housekeeping for this long, renewing every third of it; a node that dies hands them over
    # within it.
    timer_lease_s: float = Field(default=30.0, ge=1, le=3600)
    seg_jpeg2000_copy: bool = False  # also store a JPEG 2000 SEG; C-STORE may choose it
    # Retention (housekeeping): only studies whose deliveries are all confirmed are removed.
    retention_days: float = Field(default=0.0, ge=0)  # after this long; 0 keeps them
    retention_disk_percent: float = Field(default=0.0, ge=0, le=100)  # oldest first above; 0 off
    housekeeping_interval_s: float = Field(default=600.0, gt=0)
    # An instance whose Series / SOP Instance UID is held under another study, or whose patient
    # differs from its study's: refused with a failure status, or kept in quarantine (success).
    identity_conflict: Literal["reject", "quarantine"] = "reject"
    # A SOP Instance UID sent again with other bytes: keep the first (new bytes to quarantine),
    # replace the stored file (the study reopens), or refuse with a failure status.
    resend_policy: Literal["keep_first", "replace", "reject"] = "keep_first"
    # How long a browser stays signed in to the web face (no sliding renewal).
    session_hours: float = Field(default=8.0, gt=0, le=24 * 30)
    # Failed sign-ins one address may make in a burst; it earns one more every 30 s, and while it
    # has none left its sign-ins are refused unchecked (HTTP 429).
    login_failures_per_address: int = Field(default=10, ge=1, le=10_000)
    # The study in the hospital's own viewer, linked from the result viewer: a URL in which
    # {study_uid} is replaced (e.g. an OHIF or Orthanc address). Empty: no link.
    pacs_viewer_url: str = Field(default="", max_length=2000)
    # The web face over HTTPS with tls_cert_file and tls_key_file (TLS 1.2+, ECDHE with AES-GCM
    # for TLS 1.2); off: plain HTTP, for a loopback-only node or behind a TLS reverse proxy.
    web_tls: bool = False
    # Client certificates on the web face, from tls_ca_file: none asked, optional, or required
    # (its own setting: DICOM's tls_require_client_cert must not force one on every browser).
    web_tls_client_cert: Literal["none", "optional", "required"] = "none"
    # The audit trail's syslog collector (RFC 5424 over TLS, RFC 5425); empty host: not sent
    # (the trail is kept in the catalog either way). The CA file verifies the collector; the
    # client certificate and key are offered when set (mutual authentication).
    audit_syslog_host: str = Field(default="", max_length=255)
    audit_syslog_port: int = Field(default=6514, ge=1, le=65535)
    audit_syslog_ca_file: Path | None = None
    audit_syslog_cert_file: Path | None = None
    audit_syslog_key_file: Path | None = None

    @field_validator("job_workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: Any) -> Any:
        """``auto`` (or empty, in an environment variable) is the default: sized at start."""
        if isinstance(value, str) and value.strip().lower() in ("auto", ""):
            return None
        return value

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("log_verbose_libraries", "model_sha256_allowlist", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """From the environment: a JSON list, or names separated by commas or spaces."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return tuple(part for part in re.split(r"[\s,]+", text) if part)
        return value

    @field_validator("model_sha256_allowlist")
    @classmethod
    def _digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        digests = tuple(v.strip().lower() for v in value)
        for digest in digests:
            if not _SHA256.fullmatch(digest):
                raise ValueError(f"{digest[:80]!r} is not a SHA-256 digest (64 hex digits)")
        return digests

    @field_validator("models_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """Bundles execute code: which folder they come from is fixed at start, not by a
        later working directory."""
        return value.expanduser().resolve()

    @field_validator("tls_cert_file", "tls_key_file", "tls_ca_file", "tls_crl_file")
    @classmethod
    def _absolute_file(cls, value: Path | None) -> Path | None:
        """Read again when they change (a renewed certificate): fixed at start, as models_dir."""
        return None if value is None else value.expanduser().resolve()

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, value: str, info: ValidationInfo) -> str:
        """A Celery job queue needs a broker it can name; the URL's form is checked here, the
        broker itself when the node starts."""
        if info.data.get("job_queue") != "celery":
            return value
        if not value:
            raise ValueError("job_queue celery needs a broker_url (redis://... or amqp://...)")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - a port that is not a number raises here
        except ValueError as exc:
            raise ValueError(f"is not a URL: {exc}") from exc
        if parts.scheme not in BROKER_SCHEMES:
            raise ValueError(
                f"scheme {parts.scheme!r} is not a broker this node speaks "
                f"(use {', '.join(BROKER_SCHEMES)})"
            )
        if not parts.hostname:
            raise ValueError("names no broker host")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _web_tls_has_certificate(self) -> NodeOptions:
        if self.web_tls and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError("web_tls needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _wait_covers_quiet(self) -> NodeOptions:
        if self.max_wait_s < self.quiet_period_s:
            raise ValueError("max_wait_s must be at least quiet_period_s")
        return self

    @model_validator(mode="after")
    def _dicom_ports(self) -> NodeOptions:
        """Whether the files load is checked when the node starts (:mod:`pacs_node.tls`)."""
        if self.dicom_port == 0 and self.dicom_tls_port == 0:
            raise ValueError("dicom_port and dicom_tls_port are both 0: no DICOM port is open")
        if self.dicom_port != 0 and self.dicom_port == self.dicom_tls_port:
            raise ValueError("dicom_tls_port must differ from dicom_port")
        if self.dicom_tls_port and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError("dicom_tls_port needs tls_cert_file and tls_key_file")
        if self.tls_require_client_cert and self.tls_ca_file is None:
            raise ValueError("tls_require_client_cert needs tls_ca_file")
        if self.tls_crl_file is not None and self.tls_ca_file is None:
            raise ValueError("tls_crl_file needs tls_ca_file")
        return self

    @property
    def catalog_url(self) -> str:
        """The database URL in force: the configured one, or a SQLite file in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def node_name(self) -> str:
        """This node's stable name in what it owns on a shared catalog and data path (claims,
        the timer lease, its registration, its partial files): ``node_id``, else the host name
        and a digest of the data folder."""
        if self.node_id:
            return self.node_id
        folder = str(self.data_dir.resolve()).encode("utf-8", "surrogateescape")
        return f"{socket.gethostname()[:40]}:{hashlib.sha256(folder).hexdigest()[:12]}"


class NodeSettings(NodeOptions, BaseSettings):
    """``NodeOptions`` read from ``PACS_NODE_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False
    )


class PeerConfig(BaseModel):
    """A remote AE: who may send to the node, and where results can be sent back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str
    host: str | None = Field(
        default=None, description="if set, associations from this AE must come from this host"
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="the peer's DICOM port")
    quiet_period_s: float | None = Field(default=None, gt=0)
    mpps: bool | None = None  # None: the node's ``mpps``
    # The subject of the TLS client certificate this AE must show: a distinguished name
    # ("CN=CT1,O=Hospital", attributes in any order) or a common name alone ("CT1"). Set, the AE
    # is accepted only over TLS with that certificate, even when the node is promiscuous.
    tls_subject: str | None = Field(default=None, min_length=1, max_length=1024)
    description: str = ""

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("tls_subject")
    @classmethod
    def _valid_subject(cls, value: str | None) -> str | None:
        if value is not None and "=" in value:
            try:
                parse_subject(value)
            except ValueError as exc:
                raise ValueError(f"{value[:80]!r} is not a distinguished name: {exc}") from exc
        return value


class PeersFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: tuple[PeerConfig, ...] = ()
    destinations: dict[str, Destination] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> PeersFile:
        seen: set[str] = set()
        for peer in self.peers:
            if peer.ae_title in seen:
                raise ValueError(f"AE title {peer.ae_title!r} is listed twice")
            seen.add(peer.ae_title)
        return self

    @model_validator(mode="after")
    def _destinations(self) -> PeersFile:
        ports = {p.ae_title: p for p in self.peers if p.port is not None}
        for name, dest in self.destinations.items():
            check_destination_name(name)
            if name in ports:
                raise ValueError(
                    f"destination {name!r}: the peer {name!r} has a port and is already a "
                    "destination by that name"
                )
            if isinstance(dest, DimseDestination) and dest.peer is not None:
                peer = ports.get(dest.peer)
                if peer is None or peer.host is None:
                    raise ValueError(
                        f"destination {name!r}: peer {dest.peer!r} must be in peers with a host "
                        "and a port"
                    )
        return self


class Settings(BaseModel):
    """Everything the node is told, built once at start and passed down."""

    model_config = ConfigDict(frozen=True)

    node: NodeOptions
    peers: tuple[PeerConfig, ...] = ()
    routes: RoutesFile = RoutesFile()
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    config_dir: Path | None = None

    def peer(self, ae_title: str) -> PeerConfig | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def quiet_period_for(self, calling_ae: str | None) -> float:
        peer = self.peer(calling_ae) if calling_ae else None
        if peer is not None and peer.quiet_period_s is not None:
            return peer.quiet_period_s
        return self.node.quiet_period_s

    def mpps_for(self, calling_ae: str | None) -> bool:
        """Whether ``calling_ae`` may create and set Modality Performed Procedure Steps."""
        peer = self.peer(calling_ae) if calling_ae else None
        if peer is not None and peer.mpps is not None:
            return peer.mpps
        return self.node.mpps

    def mpps_offered(self) -> bool:
        """Whether the SCP offers the MPPS SOP class at all (to someone)."""
        return self.node.mpps or any(peer.mpps for peer in self.peers)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "(syntax)"
        raise ConfigError(str(path), where, f"not valid YAML: {exc.problem}") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "(top level)", "must be a mapping of keys to values")
    return raw


def _validate_file(model: type[_M], path: Path, values: dict[str, Any]) -> _M:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(str(path), _format_loc(first["loc"]), first["msg"]) from exc


def resolve_config_dir(config_dir: Path | None) -> Path | None:
    """``--config DIR``, else ``$PACS_NODE_CONFIG_DIR``, else ``./ae_config`` when present;
    made absolute, so what the node reads does not depend on a later working directory."""
    if config_dir is not None:
        if not config_dir.is_dir():
            raise ConfigError(str(config_dir), "--config", "is not a directory")
        return config_dir.resolve()
    from_env = os.environ.get(CONFIG_DIR_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_dir():
            raise ConfigError(CONFIG_DIR_ENV, from_env, "is not a directory")
        return path.resolve()
    default = Path("ae_config")
    return default.resolve() if default.is_dir() else None


def load_settings(
    config_dir: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the settings tree; raise :class:`ConfigError` naming file, key and reason."""
    directory = resolve_config_dir(config_dir)
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}

    node_values: dict[str, Any] = {}
    peers = PeersFile()
    routes = RoutesFile()
    if directory is not None:
        node_path = directory / NODE_FILE
        if node_path.exists():
            node_values = _read_yaml(node_path)
            _validate_file(NodeOptions, node_path, node_values)
        peers_path = directory / PEERS_FILE
        if peers_path.exists():
            peers = _validate_file(PeersFile, peers_path, _read_yaml(peers_path))
        routes_path = directory / ROUTES_FILE
        if routes_path.exists():
            routes = _validate_file(RoutesFile, routes_path, _read_yaml(routes_path))

    node = _build_node(node_values, cli, directory)
    _check_bound_peers(node, peers.peers, directory)
    return Settings(
        node=node,
        peers=peers.peers,
        routes=routes,
        destinations=dict(peers.destinations),
        config_dir=directory,
    )


def _check_bound_peers(
    node: NodeOptions, peers: tuple[PeerConfig, ...], directory: Path | None
) -> None:
    """A peer bound to a certificate subject can only be accepted over TLS with client
    certificates verified: without the TLS port or its CA it would be refused for ever."""
    for index, peer in enumerate(peers):
        if peer.tls_subject is None:
            continue
        missing = (
            "dicom_tls_port"
            if not node.dicom_tls_port
            else "tls_ca_file"
            if node.tls_ca_file is None
            else None
        )
        if missing is not None:
            raise ConfigError(
                str((directory or Path(".")) / PEERS_FILE),
                f"peers[{index}].tls_subject",
                f"{peer.ae_title} is bound to a certificate subject, but node.yaml has no "
                f"{missing}: its associations could never be accepted",
            )


def _build_node(
    file_values: dict[str, Any], cli: dict[str, Any], directory: Path | None
) -> NodeOptions:
    class _Layered(NodeSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            files = InitSettingsSource(settings_cls, init_kwargs=file_values)
            return (init_settings, env_settings, files)

    try:
        layered = _Layered(**cli)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "(settings)"
        env_name = f"{ENV_PREFIX}{key.upper()}"
        if key in cli:
            source = "command line"
        elif env_name in {name.upper() for name in os.environ}:
            source, key = "environment", env_name
        else:
            source = str((directory or Path(".")) / NODE_FILE)
        raise ConfigError(source, key, first["msg"]) from exc
    return NodeOptions.model_validate(layered.model_dump())
