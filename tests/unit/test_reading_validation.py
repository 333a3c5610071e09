"""pydicom's read validation is switched off by the processes that receive, when they start,
and never by importing a module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pynetdicom import _config, dimse_messages

from pacs_node.config import NodeOptions, Settings
from pacs_node.ingest.recorder import RecordSink
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool
from pacs_node.refs import CommitmentReport, InstanceRef

ROOT = Path(__file__).resolve().parents[2]

_IMPORT_ALL = """
from pydicom import config
before = config.settings.reading_validation_mode
import pacs_node.ingest.scp, pacs_node.ingest.workers, pacs_node.node
after = config.settings.reading_validation_mode
print(before, after, config.IGNORE)
"""


class _Nowhere(RecordSink):
    def submit(self, ref: InstanceRef) -> None:
        raise AssertionError("nothing is received in this test")

    def count(self, name: str, by: int = 1) -> None:
        raise AssertionError("nothing is counted in this test")

    def duplicate(self, study_uid: str) -> None:
        raise AssertionError("nothing is received in this test")

    def commitment_report(self, report: CommitmentReport) -> None:
        raise AssertionError("nothing is reported in this test")


def test_importing_the_receiver_leaves_pydicom_validating() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "models")])}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    before, after, ignore = done.stdout.split()
    assert before != ignore
    assert after == before


def test_a_storage_scp_reads_without_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every process-wide setting the SCP makes is put back after the test.
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(
        _config, "UNRESTRICTED_STORAGE_SERVICE", _config.UNRESTRICTED_STORAGE_SERVICE
    )
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    settings = Settings(node=NodeOptions(data_dir=tmp_path))
    StorageSCP(settings, Spool(tmp_path / "spool"), _Nowhere())
    assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
