"""The shipped ways of running the node give it the stop it was built for: the systemd unit and
the container image signal the main process, wait longer than ``stop_timeout_s`` before their
SIGKILL, and the unit passes ``systemd-analyze verify`` with nothing to say."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pacs_node.config import NodeOptions

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "docker" / "pacs-node.service"
EXEC = "/opt/pacs-node/.venv/bin/pacs-node"
STOP_TIMEOUT_S = NodeOptions().stop_timeout_s
BOOLEANS = {"yes", "no", "true", "false"}
EXIT_MARGIN_S = 5.0  # a forced stop and the interpreter's exit fit in this after stop_timeout_s

# Values systemd accepts for the keys the node's stop and hardening rely on (systemd.kill(5),
# systemd.service(5), systemd.exec(5)): checked everywhere, and systemd-analyze where installed.
ALLOWED = {
    "KillMode": {"control-group", "mixed", "process", "none"},
    "KillSignal": {"SIGTERM", "SIGINT"},
    "Restart": {"no", "on-success", "on-failure", "on-abnormal", "on-abort", "always"},
    "Type": {"simple", "exec", "notify", "forking", "oneshot"},
    "ProtectSystem": {"yes", "full", "strict"},
    "ProtectHome": {"yes", "read-only", "tmpfs"},
}
BOOLEAN_KEYS = {
    "NoNewPrivileges",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictSUIDSGID",
    "RestrictRealtime",
    "RestrictNamespaces",
    "LockPersonality",
}
SPAN_KEYS = {"TimeoutStopSec", "RestartSec"}
SPAN = re.compile(r"(\d+)\s*(s|sec|min|m)?")


def _section(text: str, name: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == name:
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def _seconds(span: str) -> float:
    match = SPAN.fullmatch(span)
    assert match, f"not a time span: {span}"
    return float(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def test_the_unit_stops_the_node_the_way_it_stops_best() -> None:
    service = _section(UNIT.read_text(), "Service")
    assert service["KillMode"] == ["mixed"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert _seconds(service["TimeoutStopSec"][0]) >= STOP_TIMEOUT_S + EXIT_MARGIN_S
    assert service["Restart"] == ["on-failure"]
    assert service["User"] == ["pacsnode"]
    assert service["ExecStart"] == [f"{EXEC} serve --config /etc/pacs-node"]
    assert "PACS_NODE_DATA_DIR=/var/lib/pacs-node" in service["Environment"]
    assert service["ReadWritePaths"] == ["/var/lib/pacs-node"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == service["PrivateTmp"] == ["yes"]


def _findings(unit: Path) -> str:
    """Values outside the table above, then what systemd-analyze says where it is installed (it
    warns and goes on for unknown keys and bad values, so anything it says is a finding)."""
    findings = []
    for key, values in _section(unit.read_text(), "Service").items():
        allowed = ALLOWED.get(key, BOOLEANS if key in BOOLEAN_KEYS else None)
        for value in values:
            if (allowed is not None and value not in allowed) or (
                key in SPAN_KEYS and not SPAN.fullmatch(value)
            ):
                findings.append(f"{key}={value}")
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        findings.extend(line for line in (result.stdout + result.stderr).splitlines() if line)
        if result.returncode != 0:
            findings.append(f"systemd-analyze exit status {result.returncode}")
    return "\n".join(findings)


def test_the_unit_passes_systemd_checks_that_report_a_bad_value(tmp_path: Path) -> None:
    """The copy checked differs only in ExecStart, pointed at this machine's pacs-node (systemd
    checks that the program exists); a copy with a bad KillMode shows that findings surface."""
    here = str(Path(sys.executable).parent / "pacs-node")
    text = UNIT.read_text().replace(EXEC, here)
    unit = tmp_path / "pacs-node.service"
    unit.write_text(text)
    assert _findings(unit) == ""
    unit.write_text(text.replace("KillMode=mixed", "KillMode=gently"))
    assert "gently" in _findings(unit)


def test_the_image_and_compose_give_the_node_its_stop_time() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.MULTILINE)
    assert "apt-get install -y --no-install-recommends tini" in dockerfile
    # tini hands the signal to the node alone (no -g): the node stops its workers itself; the
    # entry point script replaces itself with pacs-node, so the signal reaches the node
    entry = r'^ENTRYPOINT \["/usr/bin/tini", "--", "/usr/local/bin/pacs-node-entrypoint"\]$'
    assert re.search(entry, dockerfile, re.M)
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert re.search(r'^exec "\$PACS_NODE" "\$@"$', script, re.M)
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    nodes = [name for name in compose["services"] if name.startswith(("ingest-", "worker-"))]
    assert len(nodes) == 4
    for name in nodes:
        grace = compose["services"][name]["stop_grace_period"]
        assert _seconds(grace) >= STOP_TIMEOUT_S + EXIT_MARGIN_S, name
