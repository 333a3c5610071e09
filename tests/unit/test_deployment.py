"""The deployment files: docker/compose.yaml against the Compose Specification's JSON schema
(the copy check-jsonschema ships, so no network), the Kubernetes manifests' structure, and the
image's entry point run outside a container."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PACS_NODE, clean_env

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    checked = _check_compose(DOCKER / "compose.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    broken["services"]["redis"]["restart_policy"] = "always"  # not a Compose key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert _check_compose(tmp_path / "compose.yaml").returncode != 0


def test_compose_runs_a_group_two_ingest_nodes_two_workers_and_their_services() -> None:
    services: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    nodes = {name: s for name, s in services.items() if s.get("command") == ["serve"]}
    workers = {name: s for name, s in services.items() if s.get("command") == ["worker"]}
    assert len(nodes) == 2
    assert len(workers) == 2
    group = {**nodes, **workers}
    ids = {s["environment"]["PACS_NODE_NODE_ID"] for s in group.values()}
    assert len(ids) == 4  # each its own name in claims and leases
    for service in group.values():
        env = service["environment"]
        assert env["PACS_NODE_DATABASE_URL"].startswith("postgresql")
        assert env["PACS_NODE_BROKER_URL"].startswith("redis://redis")
        assert "node-data:/var/lib/pacs-node" in service["volumes"]  # one shared data path
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert services["fhir"]["environment"]["hapi.fhir.fhir_version"] == "R4"
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_compose_config_loads_and_sends_results_to_the_compose_pacs_and_ehr(
    tmp_path: Path,
) -> None:
    """docker/config, mounted at /etc/pacs-node, loads with the node's own loader; the scanners'
    AE titles are let in and every rule sends to Orthanc and the FHIR server of compose.yaml."""
    from pacs_node.config import load_settings
    from pacs_node.destinations import DicomWebDestination, FhirDestination

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert "./config:/etc/pacs-node:ro" in services["ingest-1"]["volumes"]
    settings = load_settings(
        DOCKER / "config", {"data_dir": str(tmp_path / "var"), "models_dir": str(REPO / "models")}
    )
    peers = {p.ae_title: p for p in settings.peers}
    assert {"CT_SCANNER_1", "CT_SCANNER_2", "MR_SCANNER_1", "STORESCU"} <= set(peers)
    orthanc = services["orthanc"]["environment"]["ORTHANC__DICOM_AET"]
    assert (peers[orthanc].host, peers[orthanc].port) == ("orthanc", 4242)  # DIMSE, by AE
    assert "4242:4242" in services["orthanc"]["ports"]
    destinations = settings.destinations
    web, ehr = destinations["PACS_WEB"], destinations["EHR"]
    assert isinstance(web, DicomWebDestination)
    assert web.url.startswith("http://orthanc:8042/")
    assert isinstance(ehr, FhirDestination)
    assert ehr.base_url.startswith("http://fhir:8080/")  # the HAPI service's own port
    assert "8090:8080" in services["fhir"]["ports"]
    known = {ae for ae, peer in peers.items() if peer.port} | set(destinations)
    for rule in settings.routes.rules:
        assert rule.send, rule.name
        sent_to = {name for names in rule.send.values() for name in names}
        assert sent_to <= known, rule.name
        assert {orthanc, "EHR"} <= sent_to, rule.name


def test_kubernetes_manifests_are_consistent() -> None:
    documents = [
        d
        for path in sorted((DOCKER / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    named = {(d["kind"], d["metadata"]["name"]) for d in documents}
    ports: dict[str, set[str]] = {}
    for doc in documents:
        assert set(doc) >= {"apiVersion", "kind", "metadata"}, doc
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it
        if doc["kind"] != "Deployment":
            continue
        assert doc["apiVersion"] == "apps/v1"
        template = doc["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in named
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in named
        for container in template["spec"]["containers"]:
            assert container["args"][0] in {"serve", "worker"}
            assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
            ports[labels["role"]] = {p["name"] for p in container.get("ports", [])}
    assert {"serve", "worker"} == {
        c["args"][0]
        for d in documents
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    for doc in documents:
        if doc["kind"] == "Service":
            role = doc["spec"]["selector"]["role"]
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports[role]


def test_kubernetes_config_map_is_a_whole_config_folder_and_pods_have_probes(
    tmp_path: Path,
) -> None:
    """The ConfigMap replaces /etc/pacs-node: loaded with the node's own loader it lets peers
    in, has rules and destinations; ingest pods are probed on /readyz, workers by a process."""
    from pacs_node.config import load_settings

    documents = list(yaml.safe_load_all((DOCKER / "k8s" / "pacs-node.yaml").read_text()))
    (config_map,) = [d for d in documents if d and d["kind"] == "ConfigMap"]
    folder = tmp_path / "etc"
    folder.mkdir()
    for name, text in config_map["data"].items():
        (folder / name).write_text(text)
    settings = load_settings(
        folder, {"data_dir": str(tmp_path / "var"), "models_dir": str(REPO / "models")}
    )
    assert settings.peers
    assert settings.routes.rules
    assert settings.destinations
    for name in ("peers.yaml", "routes.yaml"):  # mirrors docker/config
        assert config_map["data"][name] == (DOCKER / "config" / name).read_text()
    containers = {
        c["args"][0]: c
        for d in documents
        if d and d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert containers["serve"]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert containers["serve"]["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert containers["worker"]["livenessProbe"]["exec"]["command"][0] == "python"
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        if service.get("command") in (["serve"], ["worker"]):
            assert "python" in service["healthcheck"]["test"], name
            if service["command"] == ["serve"]:
                assert "/readyz" in service["healthcheck"]["test"][-1], name


def _entrypoint(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env() | {
        "PACS_NODE_BIN": PACS_NODE,
        "PACS_NODE_CONFIG_DIR": str(config),
        "COLUMNS": "200",
    }
    return subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    folder = tmp_path / "ae_config"
    shutil.copytree(REPO / "ae_config", folder)
    node = yaml.safe_load((folder / "node.yaml").read_text()) or {}
    node["data_dir"] = str(tmp_path / "var")
    node["models_dir"] = str(REPO / "models")
    (folder / "node.yaml").write_text(yaml.safe_dump(node))
    return folder


def test_the_entry_point_checks_the_configuration_before_serve(
    config: Path, tmp_path: Path
) -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    helped = _entrypoint(config, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout
    checked = _entrypoint(config, "serve", "--help")  # the check, then serve's own help
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Usage" in checked.stdout
    routes = yaml.safe_load((config / "routes.yaml").read_text())
    routes["rules"][0]["models"] = ["no-such-model"]
    (config / "routes.yaml").write_text(yaml.safe_dump(routes))
    refused = _entrypoint(config, "serve")
    assert refused.returncode != 0
    said = "".join((refused.stdout + refused.stderr).split())  # the console wraps lines
    assert "routes.yaml" in said
    assert "no-such-model" in said
