"""Settings: embedded defaults, files, env and CLI precedence, and errors naming file/key/reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node.config import load_settings
from pacs_node.errors import ConfigError

FLAT_ENV = {
    "PACS_NODE_AE_TITLE": ("ae_title", "ENVNODE", "ENVNODE"),
    "PACS_NODE_DICOM_PORT": ("dicom_port", "4104", 4104),
    "PACS_NODE_WEB_PORT": ("web_port", "9090", 9090),
    "PACS_NODE_DATA_DIR": ("data_dir", "/srv/pacs", Path("/srv/pacs")),
    "PACS_NODE_DATABASE_URL": ("database_url", "postgresql://h/db", "postgresql://h/db"),
    "PACS_NODE_QUIET_PERIOD_S": ("quiet_period_s", "12.5", 12.5),
    "PACS_NODE_MPPS": ("mpps", "true", True),
    "PACS_NODE_MPPS_MAX_OPEN_STEPS": ("mpps_max_open_steps", "50", 50),
    "PACS_NODE_PROMISCUOUS": ("promiscuous", "true", True),
    "PACS_NODE_MAX_INSTANCE_MB": ("max_instance_mb", "512", 512),
    "PACS_NODE_ASSOC_REQUEST_TIMEOUT_S": ("assoc_request_timeout_s", "2.5", 2.5),
    "PACS_NODE_MAX_ASSOC_REQUEST_BYTES": ("max_assoc_request_bytes", "65536", 65536),
    "PACS_NODE_STOP_TIMEOUT_S": ("stop_timeout_s", "90", 90.0),
    "PACS_NODE_BROKER_URL": ("broker_url", "redis://h:6379/0", "redis://h:6379/0"),
    "PACS_NODE_JOB_LEASE_S": ("job_lease_s", "30", 30.0),
}


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [*FLAT_ENV, "PACS_NODE_CONFIG_DIR"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_embedded_defaults() -> None:
    settings = load_settings()
    node = settings.node
    assert (node.ae_title, node.dicom_port, node.web_port) == ("PACSNODE", 11112, 8080)
    assert node.data_dir == Path("var")
    assert node.catalog_url.startswith("sqlite:///")
    assert node.catalog_url.endswith("catalog.sqlite")
    assert node.quiet_period_s == 30
    assert node.max_wait_s == 600
    assert node.promiscuous is False
    assert settings.peers == ()


@pytest.mark.parametrize(("env", "expected"), FLAT_ENV.items())
def test_each_flat_env_name_works(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: tuple[str, str, object]
) -> None:
    field, raw, value = expected
    monkeypatch.setenv(env, raw)
    assert getattr(load_settings().node, field) == value


def test_precedence_cli_over_env_over_file_over_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "cfg"
    _write(config, "node.yaml", "dicom_port: 2000\nweb_port: 2001\nae_title: FILENODE\n")
    assert load_settings(config).node.dicom_port == 2000
    monkeypatch.setenv("PACS_NODE_DICOM_PORT", "3000")
    monkeypatch.setenv("PACS_NODE_WEB_PORT", "3001")
    settings = load_settings(config, {"dicom_port": 4000})
    assert settings.node.dicom_port == 4000  # command line
    assert settings.node.web_port == 3001  # env beats file
    assert settings.node.ae_title == "FILENODE"  # file beats default
    assert settings.node.quiet_period_s == 30  # default


def test_config_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "elsewhere"
    _write(config, "node.yaml", "ae_title: FROMENVDIR\n")
    monkeypatch.setenv("PACS_NODE_CONFIG_DIR", str(config))
    assert load_settings().node.ae_title == "FROMENVDIR"


def test_peers_and_per_ae_quiet_period(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    _write(
        config,
        "peers.yaml",
        "peers:\n  - ae_title: CT1\n    host: 10.0.0.5\n    port: 104\n    quiet_period_s: 5\n"
        "  - ae_title: MR1\n",
    )
    settings = load_settings(config)
    assert [p.ae_title for p in settings.peers] == ["CT1", "MR1"]
    assert settings.quiet_period_for("CT1") == 5
    assert settings.quiet_period_for("MR1") == 30
    assert settings.quiet_period_for(None) == 30


def test_mpps_per_peer_overrides_the_node(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    peers = "peers:\n  - ae_title: CT1\n    mpps: false\n  - ae_title: MR1\n    mpps: true\n"
    peers += "  - ae_title: US1\n"
    _write(config, "peers.yaml", peers)
    settings = load_settings(config)  # off for the node by default: only MR1 is trusted
    assert settings.node.mpps is False
    assert (settings.mpps_for("CT1"), settings.mpps_for("MR1"), settings.mpps_for("US1")) == (
        False,
        True,
        False,
    )
    assert settings.mpps_for(None) is False
    assert settings.mpps_offered()  # MR1 may
    _write(config, "node.yaml", "mpps: true\n")
    on = load_settings(config)
    assert (on.mpps_for("CT1"), on.mpps_for("MR1"), on.mpps_for("US1")) == (False, True, True)
    _write(config, "node.yaml", "mpps: false\n")
    _write(config, "peers.yaml", "peers:\n  - ae_title: CT1\n")
    assert not load_settings(config).mpps_offered()
    _write(config, "peers.yaml", "peers:\n  - ae_title: CT1\n    mpps: maybe\n")
    with pytest.raises(ConfigError, match="mpps"):
        load_settings(config)


@pytest.mark.parametrize(
    ("name", "text", "key", "reason"),
    [
        ("node.yaml", "dicom_port: seventy\n", "dicom_port", "valid integer"),
        ("node.yaml", "dicom_port: 70000\n", "dicom_port", "less than or equal to 65535"),
        ("node.yaml", "ae_title: WAY_TOO_LONG_AE_TITLE\n", "ae_title", "at most 16"),
        ("node.yaml", "colour: blue\n", "colour", "Extra inputs are not permitted"),
        ("node.yaml", "stop_timeout_s: 1\n", "stop_timeout_s", "greater than or equal to 2"),
        ("node.yaml", "torch_threads: -1\n", "torch_threads", "greater than or equal to 0"),
        ("node.yaml", "torch_threads: auto\n", "torch_threads", "valid integer"),
        ("node.yaml", "job_workers: 33\n", "job_workers", "less than or equal to 32"),
        ("node.yaml", "quiet_period_s: [1\n", "line 2 column 1", "not valid YAML"),
        ("node.yaml", "- a\n- b\n", "(top level)", "mapping"),
        ("peers.yaml", "peers:\n  - host: 1.2.3.4\n", "peers[0].ae_title", "Field required"),
        ("peers.yaml", "peers:\n  - ae_title: A\n  - ae_title: A\n", "(top level)", "twice"),
        ("peers.yaml", "peers:\n  - ae_title: A\n    port: 0\n", "peers[0].port", "greater"),
        (
            "routes.yaml",
            "rules:\n  - {name: a, models: [m]}\n  - {name: a, models: [m]}\n",
            "(top level)",
            "unique",
        ),
        ("routes.yaml", "rules:\n  - {name: a, models: []}\n", "rules[0].models", "at least 1"),
        (
            "routes.yaml",
            "rules:\n  - name: a\n    models: [m]\n    when: {modality: '(CT'}\n",
            "rules[0].when.modality.match",
            "not a valid regular expression",
        ),
    ],
)
def test_bad_file_names_file_key_and_reason(
    tmp_path: Path, name: str, text: str, key: str, reason: str
) -> None:
    path = _write(tmp_path / "cfg", name, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "cfg")
    error = caught.value
    assert error.source == str(path)
    assert error.key == key
    assert reason in error.reason


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_NODE_DICOM_PORT", "not-a-port")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.source == "environment"
    assert caught.value.key == "PACS_NODE_DICOM_PORT"


def test_missing_config_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        load_settings(tmp_path / "nope")


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.node.dicom_port = 1  # type: ignore[misc]


def test_a_celery_job_queue_from_the_environment_checks_its_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PACS_NODE_JOB_QUEUE", "celery")
    monkeypatch.setenv("PACS_NODE_BROKER_URL", "ftp://broker/")
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    assert (caught.value.source, caught.value.key) == ("environment", "PACS_NODE_BROKER_URL")
    monkeypatch.setenv("PACS_NODE_BROKER_URL", "amqp://guest:guest@broker:5672//")
    assert load_settings(None).node.job_queue == "celery"
