"""Model bundles run code, so the node says which bytes it runs: each bundle's SHA-256 in
``pacs-node models --json``, and an optional allowlist that refuses any other bundle at start
(``routes check``, ``serve``), with the file, the key and the reason."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pacs_node.config import load_settings
from pacs_node.errors import BundleError
from pacs_node.inference.registry import Registry
from tests.conftest import PACS_NODE, clean_env, free_port

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def _expected_sha256(root: Path) -> str:
    """The documented recipe: files in relative-path order, each as path NUL size NUL bytes."""
    digest = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    for relpath, path in files:
        data = path.read_bytes()
        digest.update(f"{relpath}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _setup(tmp_path: Path, allowlist: list[str] | None = None) -> tuple[Path, Path]:
    models = tmp_path / "models"
    shutil.copytree(REPO_MODELS / "ct-classical", models / "ct-classical")
    config = tmp_path / "cfg"
    config.mkdir()
    node: dict[str, object] = {
        "models_dir": str(models),
        "data_dir": str(tmp_path / "var"),
        "dicom_host": "127.0.0.1",
        "dicom_port": free_port(),
        "web_port": free_port(),
        "job_workers": 0,
        "dicom_workers": 0,
    }
    if allowlist is not None:
        node["model_sha256_allowlist"] = allowlist
    (config / "node.yaml").write_text(yaml.safe_dump(node))
    return config, models / "ct-classical"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACS_NODE, *args],
        capture_output=True,
        text=True,
        # wide enough that no path or digest in an error is wrapped (pytest-xdist's paths are long)
        env={**clean_env(), "COLUMNS": "400", **(env or {})},
        timeout=120,
        check=False,
    )


def _models(config: Path) -> list[dict[str, object]]:
    result = _cli("models", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_models_json_prints_each_bundles_sha256(tmp_path: Path) -> None:
    config, bundle = _setup(tmp_path)
    (entry,) = _models(config)
    assert entry["sha256"] == _expected_sha256(bundle)
    assert entry["path"] == str(bundle)
    assert entry["allowed"] is True  # no allowlist: every bundle may run
    before = entry["sha256"]
    card = bundle / "docs" / "README.md"
    card.write_text(card.read_text() + "\nedited\n")
    (after,) = _models(config)
    assert after["sha256"] != before
    assert after["sha256"] == _expected_sha256(bundle)
    card.rename(bundle / "docs" / "CARD.md")  # same bytes, another name
    (renamed,) = _models(config)
    assert renamed["sha256"] not in (before, after["sha256"])


def test_a_bundle_not_on_the_allowlist_stops_the_node_at_start(tmp_path: Path) -> None:
    other = "0" * 64
    config, bundle = _setup(tmp_path, allowlist=[other])
    digest = _expected_sha256(bundle)

    check = _cli("routes", "check", "--config", str(config))
    assert check.returncode == 1
    message = " ".join(check.stderr.split())
    assert f"{config / 'node.yaml'}: model_sha256_allowlist:" in message
    assert digest in message

    serve = _cli("serve", "--config", str(config))  # refuses before opening any port
    assert serve.returncode == 1
    assert "model_sha256_allowlist" in serve.stderr
    assert digest in " ".join(serve.stderr.split())

    (entry,) = _models(config)  # still listed, with what to add to the list
    assert entry["allowed"] is False
    assert entry["sha256"] == digest

    env_name = "PACS_NODE_MODEL_SHA256_ALLOWLIST"
    by_env = _cli("routes", "check", "--config", str(config), env={env_name: f"{other},{other}"})
    assert by_env.returncode == 1
    assert f"environment: {env_name}:" in " ".join(by_env.stderr.split())
    allowed = _cli("routes", "check", "--config", str(config), env={env_name: f"{other} {digest}"})
    assert allowed.returncode == 0, allowed.stderr


def test_an_allowlist_entry_that_is_not_a_digest_is_a_config_error(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path, allowlist=["not-a-digest"])
    result = _cli("routes", "check", "--config", str(config))
    assert result.returncode == 2
    assert "model_sha256_allowlist" in result.stderr
    assert "SHA-256" in result.stderr


def test_models_dir_and_config_folder_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ae_config").mkdir()
    (tmp_path / "ae_config" / "node.yaml").write_text("models_dir: ./bundles\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PACS_NODE_CONFIG_DIR", raising=False)
    settings = load_settings(Path("ae_config"))
    assert settings.config_dir == tmp_path / "ae_config"
    assert settings.node.models_dir == tmp_path / "bundles"
    os.chdir("/")
    assert settings.node.models_dir.is_absolute()


def test_a_worker_registry_refuses_a_bundle_changed_after_start(tmp_path: Path) -> None:
    """Job workers load bundles with the allowlist too: a bundle swapped after the node
    started is refused when a job loads it, not run."""
    _, bundle = _setup(tmp_path)
    digest = _expected_sha256(bundle)
    assert Registry(bundle.parent, [digest]).get("ct-classical").sha256 == digest
    (bundle / "configs" / "inference.json").write_text('{"network_def": "$print(1)"}')
    with pytest.raises(BundleError) as refused:
        Registry(bundle.parent, [digest]).get("ct-classical")
    assert refused.value.key == "model_sha256_allowlist"
    assert str(bundle) in str(refused.value)
