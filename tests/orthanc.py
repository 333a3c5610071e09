"""A real Orthanc for tests: its own JSON config and storage in a temporary folder, loopback
ports picked by the test, started and stopped by the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_for

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class OrthancProcess:
    root: Path
    http_port: int
    dicom_port: int
    ae_title: str = "ORTHANC"
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    dicomweb: bool = False  # load the DICOMweb plugin (STOW-RS, QIDO-RS, WADO-RS)
    extra: dict[str, Any] = field(default_factory=dict)  # more configuration (e.g. DicomTls*)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-node-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,  # HTTP answers loopback only
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        config.update(self.extra)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        config = self.write_config()
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [ORTHANC, str(config)],
            stdout=log,
            stderr=log,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for(self._ready, timeout, what="Orthanc's REST API")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError((self.root / "orthanc.log").read_text(errors="replace"))
        try:
            return httpx.get(f"{self.url}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs: Any) -> Any:
        response = httpx.post(f"{self.url}{path}", timeout=120, **kwargs)
        response.raise_for_status()
        return response.json()

    def study_series(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        """Modality -> the series (with their instances' tags) of one study in Orthanc."""
        found = self.post("/tools/lookup", content=study_uid)
        studies = [f["ID"] for f in found if f["Type"] == "Study"]
        if not studies:
            return {}
        result: dict[str, list[dict[str, Any]]] = {}
        for series in self.get(f"/studies/{studies[0]}/series"):
            modality = series["MainDicomTags"].get("Modality", "")
            result.setdefault(modality, []).append(series)
        return result


def orthanc_with_dicomweb(root: Path) -> OrthancProcess:
    """An Orthanc on free loopback ports with the DICOMweb plugin, not yet started."""
    return OrthancProcess(root, http_port=free_port(), dicom_port=free_port(), dicomweb=True)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    server = orthanc_with_dicomweb(tmp_path / "orthanc").start()
    yield server
    server.stop()
