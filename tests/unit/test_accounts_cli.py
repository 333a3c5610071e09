"""``pacs-node users`` and ``tokens`` through the console script, on a data folder with no
catalog yet; the token made there works against a real web face over the same catalog, until
revoked, while the node runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import yaml

from pacs_node.services.accounts import (
    FIRST_ADMIN_PASSWORD_FILE,
    Principal,
    authenticate_password,
)
from tests.conftest import PACS_NODE, clean_env
from tests.web_node import PASSWORD, start_web_node

NEW = "another long passphrase"


def pacs_node(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACS_NODE, *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def test_users_and_tokens_on_a_fresh_catalog_then_over_http(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    data = tmp_path / "var"
    (config / "node.yaml").write_text(yaml.safe_dump({"data_dir": str(data)}))
    (config / "peers.yaml").write_text("peers: []\n")

    added = pacs_node(
        config, "users", "add", "carol", "--role", "operator", "--password-stdin", stdin=PASSWORD
    )
    assert added.returncode == 0, added.stderr
    assert PASSWORD not in added.stdout + added.stderr
    assert (data / "catalog.sqlite").exists()  # made and migrated by the command
    (listed,) = json.loads(pacs_node(config, "users", "list", "--json").stdout)
    assert (listed["name"], listed["role"], listed["tokens"]) == ("carol", "operator", 0)
    created = pacs_node(config, "tokens", "create", "carol", "--label", "ci", "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]

    node = start_web_node(data)
    try:
        # accounts existed before the first start: no admin is made, no file written
        assert not (data / FIRST_ADMIN_PASSWORD_FILE).exists()
        bearer = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=node.url, headers=bearer) as client:
            assert client.get("/api/me").json()["name"] == "carol"
            revoked = pacs_node(config, "tokens", "revoke", "carol", "--label", "ci")
            assert revoked.returncode == 0, revoked.stderr
            assert client.get("/api/me").status_code == 401
        changed = pacs_node(config, "users", "passwd", "carol", "--password-stdin", stdin=NEW)
        assert changed.returncode == 0, changed.stderr
        assert isinstance(authenticate_password(node.catalog, "carol", NEW), Principal)
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()
