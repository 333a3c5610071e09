"""A real web face for tests: the app on uvicorn at a free loopback port, over a catalog, a
spool and a recorder of its own, with accounts made through the service layer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pacs_node.actor import Actor
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.models import Role
from pacs_node.config import NodeOptions, Settings
from pacs_node.doors import NodeParts
from pacs_node.ingest.receive import Receiver
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.spool import Spool
from pacs_node.routing.rules import RoutesFile
from pacs_node.services import accounts
from pacs_node.web.door import open_door
from pacs_node.web.server import WebServer
from tests.conftest import free_port

PASSWORD = "correct horse battery"
SETUP = Actor.user("test-setup")


@dataclass
class WebNode:
    settings: Settings
    catalog: Catalog
    spool: Spool
    recorder: CatalogRecorder
    server: WebServer
    tokens: dict[Role, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def user(self, name: str, role: Role, password: str = PASSWORD) -> str:
        """Make a user with ``role`` and return a token acting as it."""
        accounts.create_user(self.catalog, name, role, password, SETUP)
        return accounts.create_token(self.catalog, name, "tests", SETUP)

    def client(self, role: Role | None = Role.ADMIN, **options: Any) -> httpx.Client:
        """An HTTP client with a bearer token of a user holding ``role`` (None: anonymous)."""
        headers = dict(options.pop("headers", {}))
        if role is not None:
            if role not in self.tokens:
                self.tokens[role] = self.user(f"test-{role.value}", role)
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **options)


def start_web_node(data_dir: Path, *, routes: RoutesFile | None = None, **options: Any) -> WebNode:
    node_options = NodeOptions(
        data_dir=data_dir,
        web_host="127.0.0.1",
        web_port=free_port(),
        fsync=False,
        min_free_mb=0,
        **options,
    )
    settings = Settings(node=node_options, routes=routes or RoutesFile())
    catalog = open_catalog(node_options.catalog_url)
    spool = Spool(node_options.spool_dir, fsync=False, min_free_bytes=0)
    recorder = CatalogRecorder(catalog, spool)
    recorder.start()
    receiver = Receiver(settings, spool, recorder, catalog)
    server = open_door(NodeParts(settings, catalog, spool, receiver))
    assert server is not None
    assert isinstance(server, WebServer)
    server.start()
    return WebNode(settings, catalog, spool, recorder, server)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[str, Samples]:
    """The text of ``url``'s ``/metrics`` (asked for without credentials) and its samples by
    name and sorted labels, as prometheus_client's own parser reads them."""
    answer = httpx.get(f"{url}/metrics", timeout=30)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return answer.text, samples


@pytest.fixture
def web_node(tmp_path: Path) -> Iterator[WebNode]:
    """The web face on a free port, stopped when the test ends."""
    node = start_web_node(tmp_path / "var")
    try:
        yield node
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()
