"""Several scanners at once (on the PostgreSQL catalog), and a full disk answered with 0xA700."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import STORESCU, NodeProcess, storescu, wait_for
from tests.dicom_factory import new_uid, write_series

pytestmark = pytest.mark.integration


def test_four_scanners_at_once_on_postgresql(
    make_node: Callable[..., NodeProcess], tmp_path: Path, postgres_url: str
) -> None:
    peers = [{"ae_title": f"CT{i}"} for i in range(4)]
    node = make_node(peers=peers, database_url=postgres_url, quiet_period_s=1.0)
    study_uid = new_uid()
    folders = []
    for i in range(4):
        write_series(tmp_path / f"s{i}", slices=25, study_uid=study_uid, series_number=i + 1)
        folders.append(tmp_path / f"s{i}")
    address = ["127.0.0.1", str(node.port)]
    senders = [
        subprocess.Popen(
            [STORESCU, "-aet", f"CT{i}", "-aec", node.ae_title, "+sd", *address, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i, folder in enumerate(folders)
    ]
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output
    study = wait_for(
        lambda: [s for s in node.studies() if s["state"] == "stable"], 30, what="stable study"
    )[0]
    assert study["study_uid"] == study_uid
    assert study["instances"] == 100
    assert sorted(s["instances"] for s in study["series"]) == [25, 25, 25, 25]
    assert not (node.data_dir / "catalog.sqlite").exists()


def test_full_disk_answers_out_of_resources(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(min_free_mb=2**40)  # more than any disk has free
    files = write_series(tmp_path / "ct", slices=2)
    result = storescu(node, *files, extra=("-v",))
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stderr  # 0xA700
    assert list((node.data_dir / "spool").rglob("*.dcm")) == []
    assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []
    assert "instance refused" in node.log_text()


def _scp_workers(node: NodeProcess) -> list[int]:
    assert node.process is not None
    children = subprocess.run(
        ["pgrep", "-P", str(node.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    workers = []
    for pid in map(int, children):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "pacs-node-scp":
                workers.append(pid)
        except FileNotFoundError:  # exited meanwhile
            continue
    return workers


def test_a_dead_scp_worker_is_replaced(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(dicom_workers=2)
    workers = wait_for(lambda: len(w := _scp_workers(node)) == 2 and w, 30, what="2 workers")
    os.kill(workers[0], signal.SIGKILL)
    replaced = wait_for(
        lambda: len(w := _scp_workers(node)) == 2 and workers[0] not in w and w,
        30,
        what="a replacement worker",
    )
    assert workers[1] in replaced
    files = write_series(tmp_path / "ct", slices=6)
    for path in files:  # several associations, whichever worker accepts each
        assert storescu(node, path).returncode == 0
    wait_for(lambda: [s["instances"] for s in node.studies()] == [6], 20, what="all six")
    assert "SCP worker died" in node.log_text()
