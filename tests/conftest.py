"""Shared test helpers: free ports, deadline waits, and a real ``pacs-node serve`` process."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

BIN = Path(sys.executable).parent
PACS_NODE = str(BIN / "pacs-node")
STORESCU = "/usr/bin/storescu"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
    env["TCP_NODELAY"] = "1"
    return env


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PACS_NODE, *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pacs-node {' '.join(args)} failed:\n{result.stderr}")
    return result


@dataclass
class NodeProcess:
    """A ``pacs-node serve`` subprocess with its own config folder, data folder and port."""

    root: Path
    node: dict[str, Any]
    peers: list[dict[str, Any]] = field(default_factory=list)
    destinations: dict[str, Any] = field(default_factory=dict)  # peers.yaml `destinations:`
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "ae_config"

    @property
    def data_dir(self) -> Path:
        return Path(self.node["data_dir"])

    @property
    def port(self) -> int:
        return int(self.node["dicom_port"])

    @property
    def ae_title(self) -> str:
        return str(self.node.get("ae_title", "PACSNODE"))

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "node.yaml").write_text(yaml.safe_dump(self.node))
        peers: dict[str, Any] = {"peers": self.peers}
        if self.destinations:
            peers["destinations"] = self.destinations
        (self.config_dir / "peers.yaml").write_text(yaml.safe_dump(peers))

    def start(self, timeout: float = 60.0, *, own_group: bool = False) -> NodeProcess:
        """Start ``pacs-node serve``; ``own_group``: in a session and process group of its own
        (as a service manager starts it), so a test can signal the whole group."""
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [PACS_NODE, "serve", "--config", str(self.config_dir)],
            stdout=log,
            stderr=log,
            env=clean_env(),
            start_new_session=own_group,
        )
        wait_for(self._listening, timeout, what="the node's DICOM port")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node exited early:\n{self.log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ``pacs-node`` command that reads this node's configuration."""
        return run_cli(*args, "--config", str(self.config_dir), check=check)

    def studies(self) -> list[dict[str, Any]]:
        result = self.cli("studies", "--json")
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


POSTGRES_ADMIN_URL = os.environ.get(
    "PACS_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped after the test."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"pacs_node_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes on free loopback ports; every one is stopped when the test ends."""
    nodes: list[NodeProcess] = []

    def factory(
        peers: list[dict[str, Any]] | None = None, start: bool = True, **options: Any
    ) -> NodeProcess:
        root = tmp_path / f"node{len(nodes)}"
        node_options: dict[str, Any] = {
            "ae_title": "PACSNODE",
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "web_port": free_port(),
            "data_dir": str(root / "var"),
            "quiet_period_s": 2.0,
            "min_free_mb": 0,
            # one worker (torch on every core) unless a test asks for more: the shipped two
            # would start a second torch process per node on the shared test machine
            "job_workers": 1,
        }
        node_options.update(options)
        if peers is None:
            peers = [{"ae_title": "STORESCU"}, {"ae_title": "PACSNODE_SCU"}]
        node = NodeProcess(root=root, node=node_options, peers=peers)
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        node.stop()


def storescu(
    node: NodeProcess, *paths: Path | str, calling: str = "STORESCU", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Send with dcmtk's storescu (the real scanner of these tests)."""
    return subprocess.run(
        [
            STORESCU,
            "-aet",
            calling,
            "-aec",
            node.ae_title,
            *extra,
            "127.0.0.1",
            str(node.port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# pynetdicom's requests that pause the requestor's reactor first (``send_c_cancel`` does not).
PAUSING_SENDS = (
    "send_c_echo",
    "send_c_store",
    "send_c_find",
    "send_c_get",
    "send_c_move",
    "send_n_action",
    "send_n_create",
    "send_n_delete",
    "send_n_event_report",
    "send_n_get",
    "send_n_set",
)


@pytest.fixture(scope="session", autouse=True)
def _parked_sends() -> Iterator[None]:
    """Every pynetdicom client in the tests waits for its reactor to be really paused before a
    request (:func:`pacs_node.dimse_client.parked`), as the node's own client code does: a bare
    ``send_*`` can lose its answer to the reactor and wait out its DIMSE timeout (pynetdicom
    #875). The bare method stays reachable as ``Association.send_*.__wrapped__``."""
    from pynetdicom.association import Association

    from pacs_node.dimse_client import parked

    def parking(send: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(send)
        def parked_send(self: Association, *args: Any, **kwargs: Any) -> Any:
            return send(parked(self), *args, **kwargs)

        return parked_send

    bare = {name: getattr(Association, name) for name in PAUSING_SENDS}
    for name, send in bare.items():
        setattr(Association, name, parking(send))
    yield
    for name, send in bare.items():
        setattr(Association, name, send)


@pytest.fixture(autouse=True)
def _pynetdicom_settings() -> Iterator[None]:
    """pynetdicom's settings are process-wide: a Storage SCP built in the test process sets the
    node's, and a test may change them for its own sends; each test leaves them as it found them."""
    from pynetdicom import _config

    saved = (
        _config.UNRESTRICTED_STORAGE_SERVICE,
        _config.STORE_RECV_CHUNKED_DATASET,
        _config.STORE_SEND_CHUNKED_DATASET,
    )
    yield
    (
        _config.UNRESTRICTED_STORAGE_SERVICE,
        _config.STORE_RECV_CHUNKED_DATASET,
        _config.STORE_SEND_CHUNKED_DATASET,
    ) = saved


@pytest.fixture(autouse=True)
def _quiet_heartbeats(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registered timer lease beats on a thread of its own until stopped: stop those a test
    left running, so none writes to a test database that is gone."""
    from pacs_node.timer_lease import TimerLease

    registered: list[TimerLease] = []
    real = TimerLease.register

    def register(lease: TimerLease) -> Any:
        registered.append(lease)
        return real(lease)

    monkeypatch.setattr(TimerLease, "register", register)
    yield
    for lease in registered:
        lease._stopping.set()
