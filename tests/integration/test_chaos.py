"""Faults injected while the node works: SIGKILL at random points of ingest (the node or one
SCP worker) and of a study's job or deliveries, the disk filling up, the catalog's PostgreSQL
connection cut, the PACS and the EHR down and up. After each, everything acknowledged is stored
exactly once and catalogued, every result is delivered once, and work goes on once the fault is
gone.

``PACS_NODE_TEST_CHAOS_ROUNDS`` sets how many random ingest kills (2 by default; ``make chaos``
runs more) and, a third of it, how many studies go through the job and delivery kills (at least
one). The random seed is printed, and ``PACS_NODE_TEST_CHAOS_SEED`` replays a run. Kills at fixed
points: ``test_crash.py``, ``test_crash_delivery.py`` and ``test_pipeline_orthanc.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.engine import make_url

from pacs_node.ingest.recorder import OUTAGE_FILE
from pacs_node.ingest.spool import LOCK_FILE
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import CT_IMAGE, new_uid, write_series
from tests.integration.test_load_and_limits import _scp_workers

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("PACS_NODE_TEST_CHAOS_ROUNDS", "2"))
SEED = int(os.environ.get("PACS_NODE_TEST_CHAOS_SEED", str(time.time_ns() % 2**32)))
CALLING = "PACSNODE_SCU"
OUT_OF_RESOURCES = 0xA700


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Scanner:
    """Sends files over one pynetdicom association; remembers the status of each."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.ae = AE(ae_title=CALLING)
        self.ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        # a scanner gives up on an unanswered request after this long, and re-sends it later
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 5
        self.acknowledged: set[str] = set()
        self.statuses: dict[str, int] = {}
        self._lock = threading.Lock()

    def wait_ready(self, timeout: float = 60) -> None:
        """Until an association is accepted: a started node's SCP workers take a while."""

        def accepted() -> bool:
            assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title)
            established = bool(assoc.is_established)
            if established:
                assoc.release()
            return established

        wait_for(accepted, timeout, interval=0.2, what="an association")

    def send(self, paths: list[Path], uids: dict[Path, str]) -> None:
        assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title)
        if not assoc.is_established:
            return
        for path in paths:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(path)
            if status and "Status" in status:
                with self._lock:
                    self.statuses[uids[path]] = int(status.Status)
                    if int(status.Status) == 0:
                        self.acknowledged.add(uids[path])
        if assoc.is_established:
            assoc.release()

    def send_parallel(
        self, parts: list[list[Path]], uids: dict[Path, str]
    ) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.send, args=(part, uids)) for part in parts]
        for thread in threads:
            thread.start()
        return threads


def _spooled(node: NodeProcess) -> list[str]:
    return [p.stem for p in (node.data_dir / "spool").rglob("*.dcm")]


def _catalogued_sqlite(node: NodeProcess) -> set[str]:
    with sqlite3.connect(node.data_dir / "catalog.sqlite") as db:
        return {row[0] for row in db.execute("select sop_instance_uid from instances")}


def _stored_once(
    node: NodeProcess, acknowledged: set[str], catalogued: Callable[[], set[str]]
) -> None:
    """Every acknowledged instance has one file and one row; no row without its file."""
    spooled = _spooled(node)
    assert len(spooled) == len(set(spooled)), "an instance stored twice"
    missing = acknowledged - set(spooled)
    assert not missing, f"{len(missing)} acknowledged instances lost"
    wait_for(lambda: catalogued() == set(_spooled(node)), 30, interval=0.5, what="the catalog")
    spool = node.data_dir / "spool"
    control = {spool / LOCK_FILE, spool / OUTAGE_FILE}  # the spool's lock and outage flag
    partial = [
        p
        for p in spool.rglob("*")
        if p.is_file() and ".incoming" not in p.relative_to(spool).parts and p not in control
    ]
    assert all(p.suffix == ".dcm" for p in partial), "a partial file outside .incoming"


def test_sigkill_at_random_points_of_ingest_loses_nothing_acknowledged(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    print(f"chaos seed {SEED} (PACS_NODE_TEST_CHAOS_SEED replays it), {ROUNDS} rounds")
    node = make_node(dicom_workers=2, quiet_period_s=1.0)
    study_uid = new_uid()
    files = [
        *write_series(tmp_path / "a", slices=100, rows=32, columns=32, study_uid=study_uid),
        *write_series(tmp_path / "b", slices=100, rows=32, columns=32, study_uid=study_uid),
    ]
    uids = {path: _uid(path) for path in files}
    scanner = Scanner(node)
    for number in range(ROUNDS):
        # a scanner re-sends what was not acknowledged, as after any failed association
        pending = [p for p in files if uids[p] not in scanner.acknowledged] or files
        rng.shuffle(pending)
        victim = ("node", "scp-worker")[number % 2]
        delay = rng.uniform(0.05, 1.0)
        workers = wait_for(lambda: len(w := _scp_workers(node)) == 2 and w, 30, what="workers")
        scanner.wait_ready()
        threads = scanner.send_parallel([pending[0::2], pending[1::2]], uids)
        time.sleep(delay)  # the random point of the kill, not a synchronisation
        print(f"round {number}: SIGKILL {victim} after {delay:.2f} s")
        if victim == "node":
            node.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(workers), 9)
        for thread in threads:
            thread.join(120)
            assert not thread.is_alive(), "a sender hung after the kill"
        if victim == "node":
            node.start()
        _stored_once(node, scanner.acknowledged, lambda: _catalogued_sqlite(node))

    rest = [p for p in files if uids[p] not in scanner.acknowledged]
    scanner.wait_ready()
    for thread in scanner.send_parallel([rest], uids):
        thread.join(120)
    unanswered = {uids[p]: scanner.statuses.get(uids[p]) for p in rest}
    assert scanner.acknowledged == set(uids.values()), (unanswered, node.log_text()[-3000:])
    node.stop()
    node.start()  # a clean start finds nothing to recover and nothing half-written
    _stored_once(node, scanner.acknowledged, lambda: _catalogued_sqlite(node))
    assert sorted(_spooled(node)) == sorted(uids.values())
    assert list((node.data_dir / "spool" / ".incoming").rglob("*.part")) == []
    assert [s["instances"] for s in node.studies()] == [len(files)]


# The disk filling up ---------------------------------------------------------------------------


@contextlib.contextmanager
def _small_filesystem(mountpoint: Path, size_mib: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of ``size_mib`` at ``mountpoint``; yields a function that resizes it."""
    mountpoint.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )

    def resize(mib: int) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={mib}m", str(mountpoint)],
            check=True,
            capture_output=True,
        )

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def test_disk_filling_during_ingest_refuses_then_resumes(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A real ENOSPC: the data folder on a 6 MiB tmpfs, and 128 KiB instances sent until it is
    full. Each refused instance gets 0xA700, nothing is half-written, and once the filesystem
    grows the re-sent instances are stored and the catalog holds every acknowledged one."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root (as CI does)")
    files = write_series(tmp_path / "ct", slices=64, rows=256, columns=256)  # ~8 MiB
    uids = {path: _uid(path) for path in files}
    with _small_filesystem(tmp_path / "small", 6) as resize:
        node = make_node(data_dir=str(tmp_path / "small" / "var"), min_free_mb=0)
        scanner = Scanner(node)
        scanner.wait_ready()
        scanner.send(files, uids)
        refused = {uid for uid, status in scanner.statuses.items() if status != 0}
        assert refused, "the disk never filled"
        assert {scanner.statuses[uid] for uid in refused} == {OUT_OF_RESOURCES}
        assert len(scanner.statuses) == len(files)  # the association went on after refusals
        process = node.process
        assert process is not None
        assert process.poll() is None, node.log_text()[-2000:]
        incoming = node.data_dir / "spool" / ".incoming"
        wait_for(lambda: not list(incoming.rglob("*.part")), 10, what="no partial file")
        assert not (set(_spooled(node)) & refused)

        resize(32)  # space returns: the scanner sends what was refused again
        rest = [p for p in files if uids[p] not in scanner.acknowledged]
        scanner.send(rest, uids)
        assert scanner.acknowledged == set(uids.values())
        _stored_once(node, scanner.acknowledged, lambda: _catalogued_sqlite(node))
        assert not list(incoming.rglob("*.part"))
        assert [s["instances"] for s in node.studies()] == [len(files)]
        node.stop()


# The catalog's database connection cut and restored ---------------------------------------------


class CuttableProxy:
    """A TCP proxy on a free loopback port in front of ``target``; :meth:`cut` closes every
    connection and refuses new ones until :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


def test_catalog_connection_cut_loses_nothing_and_catches_up(
    make_node: Callable[..., NodeProcess], tmp_path: Path, postgres_url: str
) -> None:
    url = make_url(postgres_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        through_proxy = url.set(host="127.0.0.1", port=proxy.port)
        node = make_node(database_url=through_proxy.render_as_string(hide_password=False))
        study_uid = new_uid()
        before = write_series(tmp_path / "a", slices=20, study_uid=study_uid, series_number=1)
        during = write_series(tmp_path / "b", slices=40, study_uid=study_uid, series_number=2)
        uids = {path: _uid(path) for path in [*before, *during]}
        scanner = Scanner(node)
        scanner.wait_ready()
        scanner.send(before, uids)
        wait_for(lambda: [s["instances"] for s in node.studies()] == [20], 20, what="20 rows")

        proxy.cut()
        scanner.send(during, uids)  # the spool still takes them; their rows wait
        acknowledged_while_cut = set(scanner.acknowledged)
        assert len(acknowledged_while_cut) > 20, (
            "nothing was acknowledged while the catalog was cut"
        )
        process = node.process
        assert process is not None
        assert process.poll() is None, node.log_text()[-2000:]
        assert set(_spooled(node)) >= acknowledged_while_cut

        proxy.restore()

        def caught_up() -> bool:
            return sum(s["instances"] for s in node.studies()) == len(acknowledged_while_cut)

        wait_for(caught_up, 60, interval=0.5, what="the catalog to catch up after the restore")
        refused = set(uids.values()) - scanner.acknowledged
        scanner.send([p for p in during if uids[p] in refused], uids)
        assert scanner.acknowledged == set(uids.values())
        wait_for(
            lambda: [s["instances"] for s in node.studies()] == [60], 30, what="all 60 catalogued"
        )
        assert sorted(_spooled(node)) == sorted(uids.values())
        node.stop()
    finally:
        proxy.close()


# Inference and delivery: SIGKILL at a random point, the PACS and the EHR down and up -------------

PIPELINE_ROUNDS = max(1, ROUNDS // 3)  # a study each, about a minute each


def test_sigkill_in_inference_or_delivery_and_peers_down_deliver_every_result_once(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """Per round a scanner's study is routed (a job, then SEG/SR/GSPS/key images/PDF to Orthanc
    and a Bundle to the FHIR server); the node is SIGKILLed at a random moment of the job or the
    deliveries and restarted, then Orthanc and the FHIR server go down for a while and come back.
    In the end every result is in Orthanc once and every study has one DiagnosticReport."""
    import httpx
    from pydicom import dcmread

    from tests.integration.test_pipeline_orthanc import (
        KINDS,
        ROUTES_TO_ORTHANC_AND_EHR,
        _json,
        _routed_node,
    )
    from tests.integration.test_results_fhir_server import FhirServer
    from tests.orthanc import OrthancProcess

    rng = random.Random(SEED)
    print(f"chaos seed {SEED}, {PIPELINE_ROUNDS} pipeline rounds")
    orthanc_dicom, fhir_port = free_port(), free_port()
    ehr = {"type": "fhir", "base_url": f"http://127.0.0.1:{fhir_port}/fhir"}
    ehr["create_patient"] = True  # a test EHR: the Bundle brings its Patient
    node = _routed_node(
        make_node,
        orthanc_dicom,
        ROUTES_TO_ORTHANC_AND_EHR,
        {"EHR": ehr},
        delivery_backoff_s=0.5,
        delivery_backoff_max_s=2.0,
    )
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        free_port(),
        orthanc_dicom,
        modalities={"node": [node.ae_title, "127.0.0.1", node.port]},
    ).start()
    fhir = FhirServer(tmp_path / "fhir", fhir_port)
    try:
        studies = []
        for number in range(PIPELINE_ROUNDS):
            paths = write_series(
                tmp_path / f"ct{number}", slices=16, rows=64, columns=64, spacing=(5, 5, 5)
            )
            study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            studies.append(study_uid)
            sent = storescu(node, *paths)
            assert sent.returncode == 0, sent.stderr
            wait_for(
                lambda uid=study_uid: any(j["study_uid"] == uid for j in _json(node, "jobs")),
                60,
                interval=0.5,
                what="the routed job",
            )
            delay = rng.uniform(0.0, 15.0)  # the job takes ~5-15 s here, deliveries ~1-3 s
            time.sleep(delay)  # the random point of the kill, not a synchronisation
            print(f"round {number}: SIGKILL the node {delay:.1f} s after the job was queued")
            node.kill()
            node.start()
            outage = rng.uniform(1.0, 5.0)
            print(f"round {number}: Orthanc and the FHIR server down for {outage:.1f} s")
            orthanc.stop()
            fhir.stop()
            time.sleep(outage)  # the length of the outage, not a synchronisation
            orthanc.start()
            fhir = FhirServer(tmp_path / "fhir", fhir_port)

        def delivered() -> list[dict[str, Any]] | None:
            rows = _json(node, "deliveries")
            done = len(rows) == len(studies) * (len(KINDS) + 1)
            return rows if done and all(d["state"] == "delivered" for d in rows) else None

        deliveries = wait_for(delivered, 300, interval=1.0, what="every delivery")
        jobs = _json(node, "jobs")
        assert sorted(j["study_uid"] for j in jobs) == sorted(studies)  # one job per study
        assert all(j["state"] == "done" for j in jobs), jobs
        dicom = [d for d in deliveries if d["kind"] != "fhir"]
        assert len({d["sop_instance_uid"] for d in dicom}) == len(dicom)  # none built twice
        for delivery in dicom:
            found = orthanc.post("/tools/lookup", content=delivery["sop_instance_uid"])
            assert len([f for f in found if f["Type"] == "Instance"]) == 1, delivery
        assert orthanc.get("/statistics")["CountInstances"] == len(dicom)
        reports = httpx.get(f"{fhir.base}/DiagnosticReport", timeout=30).json()
        assert len(reports.get("entry", [])) == len(studies)  # one report per study
    finally:
        fhir.stop()
        orthanc.stop()
