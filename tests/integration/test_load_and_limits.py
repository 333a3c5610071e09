"""Several scanners at once (on the PostgreSQL catalog, and 8 x 300 instances with the node's
memory measured), and a full disk answered with 0xA700."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
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


SCANNERS = 8
LOAD_INSTANCES = 300  # per scanner, one study each
RSS_GROWTH_MIB = 32  # allowed growth of the node's processes together over the whole load


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # exited meanwhile
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


def node_rss_kib(node: NodeProcess) -> dict[str, int]:
    """VmRSS of the main process and of each SCP worker, in KiB."""
    assert node.process is not None
    rss = {"main": _rss_kib(node.process.pid)}
    for pid in _scp_workers(node):
        rss[f"scp-{pid}"] = _rss_kib(pid)
    return rss


def _send_all(node: NodeProcess, folders: list[Path]) -> list[str]:
    """One storescu per folder, all at once; each one's verbose output."""
    address = ["127.0.0.1", str(node.port)]
    senders = [
        subprocess.Popen(
            [STORESCU, "-v", "-aet", f"CT{i}", "-aec", node.ae_title, "+sd", *address, str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for i, f in enumerate(folders)
    ]
    outputs = []
    for sender in senders:
        output, _ = sender.communicate(timeout=600)
        assert sender.returncode == 0, output[-2000:]
        outputs.append(output)
    return outputs


def test_eight_scanners_send_eight_studies_of_300_at_once_with_flat_memory(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    peers = [{"ae_title": f"CT{i}"} for i in range(SCANNERS)]
    node = make_node(peers=peers, quiet_period_s=1.0)
    warm = [tmp_path / f"warm{i}" for i in range(SCANNERS)]
    folders = [tmp_path / f"scanner{i}" for i in range(SCANNERS)]
    for folder in warm:
        write_series(folder, slices=20, rows=16, columns=16)
    studies = {}
    for folder in folders:
        paths = write_series(folder, slices=LOAD_INSTANCES, rows=16, columns=16)
        studies[pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID] = folder
    # a first round loads every code path and cache; memory is measured from after it
    _send_all(node, warm)
    wait_for(lambda: len(node.studies()) == SCANNERS, 60, what="the warm-up studies")
    before = node_rss_kib(node)

    outputs = _send_all(node, folders)
    for output in outputs:
        assert output.count("Received Store Response (Success)") == LOAD_INSTANCES, output[-800:]

    def catalogued() -> list[dict[str, object]] | None:
        found = {s["study_uid"]: s for s in node.studies()}
        done = all(uid in found and found[uid]["instances"] == LOAD_INSTANCES for uid in studies)
        return [found[uid] for uid in studies] if done else None

    wait_for(catalogued, 120, interval=0.5, what="every instance catalogued")
    after = node_rss_kib(node)
    spooled = sum(1 for _ in (node.data_dir / "spool").rglob("*.dcm"))
    assert spooled == SCANNERS * (LOAD_INSTANCES + 20)
    growth_mib = (sum(after.values()) - sum(before.values())) / 1024
    print(f"RSS before {before} KiB, after {after} KiB, growth {growth_mib:.1f} MiB")
    assert set(after) == set(before)  # no SCP worker died and was replaced
    assert growth_mib < RSS_GROWTH_MIB, (before, after)
    assert "SCP worker died" not in node.log_text()


def test_full_disk_answers_out_of_resources(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(min_free_mb=2**40)  # more than any disk has free
    files = write_series(tmp_path / "ct", slices=2)
    result = storescu(node, *files, extra=("-v",))
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stderr  # 0xA700
    assert list((node.data_dir / "spool").rglob("*.dcm")) == []
    assert list((node.data_dir / "spool" / ".incoming").rglob("*.part")) == []
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
