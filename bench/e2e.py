"""End-to-end benchmark: from a scanner's last C-STORE to the results in the PACS and the EHR.

What it does
------------
1. Renders one procedural phantom CT (``models/phantom``: torso with organs, 2.5 mm axial
   slices, 512 x 512, default 120 slices) once, outside the clock. Every study sent is that
   image under fresh UIDs, its own patient (PatientID ``BENCH-nnn``) and accession number.
2. Starts, on 127.0.0.1 and free ports, the peers and the node:

   - Orthanc (``tests/orthanc.py``) as the destination PACS (``TCP_NODELAY=1``);
   - sekmet-fhir (its own venv ``.venv-fhir``) as the EHR, seeded with each study's Patient and
     ServiceRequest before the study is sent, so its DiagnosticReport is accepted;
   - ``pacs-node serve`` as shipped (2 SCP worker processes, `job_workers: auto`, SQLite catalog)
     with a config folder written here: two scanners ``CT_SCANNER_1`` / ``CT_SCANNER_2`` and
     Orthanc in peers.yaml, destinations ``PACS`` (dimse, peer ORTHANC, Storage Commitment as
     shipped) and ``EHR`` (fhir), and a routes.yaml sending CT to one model with seg, sr, gsps,
     key_images and pdf to ``PACS`` and fhir to ``EHR``; quiet period ``--quiet-period-s``.

   One node (with fresh peers) per model: ``ct-classical``, and ``ct-torso-organs`` when its
   bundle (``models/ct-torso-organs/configs/metadata.json``) exists.
3. Latency, ``--runs`` times (after one small warm-up study, not counted, so the job worker has
   loaded its code): one study sent by ``/usr/bin/storescu`` (one association). The clock
   starts when storescu exits (every C-STORE acknowledged) and stops (a) when Orthanc's REST
   API holds every DICOM result the node queued for ``PACS`` in that study, and (b) when the FHIR
   server returns the study's DiagnosticReport; both polled with a deadline. The split by stage
   comes from the node's own records, read after the clock stops (``studies --json``,
   ``jobs --json``):

   - quiet period: last ack -> study stable (reported, and excluded from the total);
   - routing: stable -> job queued; queue wait: queued -> claimed by the worker;
   - the job's stage timings: decode, infer (model load + pre + infer + post), build results,
     store (files fsync'd + result and delivery rows); "job, other" is the rest of the job's
     wall time (progress rows, reading the job);
   - delivery: job done -> seen in Orthanc, and job done -> report seen in the FHIR server.

   first result = last ack -> both the SEG and the SR in Orthanc (the node stores and sends
   them before it builds the rest), minus the quiet period.

   total = max(PACS, EHR) - quiet period. Each figure is the median over runs on its own (so
   the stages need not add up to the median total exactly); every run is in the JSON.
4. Throughput: ``--studies`` (10) studies sent back to back by 2 scanners, each a thread running
   one storescu (one association) per study in turn with its own calling AE. Clock: the first
   storescu starts -> every study's results are in Orthanc and every report in the FHIR server.
   Reports studies/hour, and each study's time from its own last ack to both destinations,
   and the jobs' stage seconds summed (decode, infer, build, store; from ``jobs --json``).
   ``--throughput-setups 1x2,2x1`` runs it once per ``job_workers x torch_threads`` setting
   (0 threads: the node's default share of the cores), each on a fresh node warmed up with one
   study per worker, so their studies/hour compare within one invocation.

The machine is shared (2 cores; another job may be training a model): the JSON records the load
average before and after every measurement and the busiest processes at the start. Numbers are
noisy; compare runs from one invocation.

Usage: ``python bench/e2e.py [--runs 3] [--slices 120] [--studies 10] [--small]
[--throughput-setups 1x2,2x1]``
(``--small``: 40 slices, 1 run, 4 studies, for a quick check; default output
``bench/results/e2e.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import dicom_env, free_port, stop_process, tool_version, wait_until, work_dir  # noqa: E402

from tests.orthanc import ORTHANC, OrthancProcess  # noqa: E402

STORESCU = "/usr/bin/storescu"
FHIR_VENV = Path(os.environ.get("PACS_NODE_FHIR_VENV", ROOT / ".venv-fhir"))
SEKMET = FHIR_VENV / "bin" / "sekmet"
NODE_AE = "PACSNODE"
SCANNERS = ("CT_SCANNER_1", "CT_SCANNER_2")
PACS, EHR = "PACS", "EHR"
DICOM_KINDS = ("seg", "sr", "gsps", "key_images", "pdf")
MODELS = ("ct-classical", "ct-torso-organs")
TARGET_S = 30.0
THICKNESS_MM = 2.5
MATRIX = 512
START_TIMEOUT_S = 90.0
RESULT_TIMEOUT_S = 900.0
POLL_S = 0.1
FHIR_JSON = {"Content-Type": "application/fhir+json"}


# --------------------------------------------------------------------------------------------
# Helpers


def stamp(text: str | None) -> float | None:
    """An ISO timestamp from the catalog as seconds since the epoch."""
    return datetime.fromisoformat(text).timestamp() if text else None


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def busiest_processes(count: int = 6) -> list[str]:
    """The processes using the most CPU right now (name and %CPU only)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout
        return [" ".join(line.split()) for line in out.splitlines()[1 : count + 1]]
    return []


# --------------------------------------------------------------------------------------------
# Data


def render_template(slices: int, seed: int = 11) -> list[Dataset]:
    """One phantom CT, ``slices`` x 512 x 512 at 2.5 mm, as datasets (pixels in memory)."""
    from phantom.anatomy import sample_anatomy
    from phantom.render import TRAINING, render_ct
    from phantom.writers import dicom_datasets

    fov = 1.3  # reconstruction diameter / body width: the whole body in the field of view
    diameter = 2.0 * sample_anatomy(seed).body_a * fov
    pixel = diameter / MATRIX
    ranges = replace(
        TRAINING,
        thickness_mm=(THICKNESS_MM, THICKNESS_MM),
        pixel_mm=(pixel, pixel),
        fov_scale=(fov, fov),
        coverage_mm=(slices * THICKNESS_MM, slices * THICKNESS_MM),
        max_slices=max(slices, TRAINING.max_slices),
        noise=(12.0, 12.0),
        metal=False,
    )
    case = render_ct(seed, ranges)
    if case.image.shape != (slices, MATRIX, MATRIX):
        raise RuntimeError(f"phantom rendered as {case.image.shape}, wanted {slices}x512x512")
    return list(dicom_datasets(case))


@dataclass
class Study:
    uid: str
    patient_id: str
    accession: str
    files: list[Path]
    bytes: int


def write_study(template: list[Dataset], folder: Path, index: int) -> Study:
    """The template under new UIDs as study ``index`` of its own patient."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    patient_id, accession = f"BENCH-{index:03d}", f"BENCHACC{index:03d}"
    files: list[Path] = []
    for ds in template:
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID, ds.PatientName = patient_id, f"BENCH^PATIENT{index:03d}"
        ds.AccessionNumber = accession
        ds.StudyDescription = "CT CHEST ABDOMEN"
        ds.SeriesDescription = f"Axial {THICKNESS_MM} mm"
        ds.BodyPartExamined = "CHEST"
        path = folder / f"{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(study_uid, patient_id, accession, files, sum(p.stat().st_size for p in files))


def storescu(port: int, calling_ae: str, files: Sequence[Path], log: Path) -> None:
    argv = [STORESCU, "-aet", calling_ae, "-aec", NODE_AE, "127.0.0.1", str(port)]
    with log.open("ab") as out:
        result = subprocess.run(
            [*argv, *map(str, files)],
            env=dicom_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}):\n{tail(log)}")


# --------------------------------------------------------------------------------------------
# Peers


class FhirServer:
    """sekmet-fhir on a free loopback port, in its own venv."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=30)
        self.patients: dict[str, str] = {}  # PatientID -> server id
        self._reports = 0  # DiagnosticReports on the server at the last poll

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> FhirServer:
        if not SEKMET.exists():
            raise RuntimeError(
                f"{SEKMET} missing: create {FHIR_VENV} with `pip install sekmet-fhir`"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SEKMET_BASE_URL": f"http://127.0.0.1:{self.port}"}
        log = self.folder / "server.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(SEKMET), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"FHIR server exited:\n{tail(log)}")
            try:
                return self.client.get(f"{self.base}/metadata", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, START_TIMEOUT_S, "the FHIR server", 0.2)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.client.close()

    def seed(self, study: Study) -> None:
        """The EHR knows the patient and the order before the study is acquired."""
        from pacs_node.results.options import FhirOptions

        systems = FhirOptions()
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": systems.patient_system, "value": study.patient_id}],
            "name": [{"family": "Bench", "given": [study.patient_id]}],
        }
        created = self.client.post(f"{self.base}/Patient", json=patient, headers=FHIR_JSON)
        created.raise_for_status()
        patient_id = str(created.json()["id"])
        order = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "identifier": [{"system": systems.accession_system, "value": study.accession}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"text": "CT chest abdomen"},
        }
        self.client.post(
            f"{self.base}/ServiceRequest", json=order, headers=FHIR_JSON
        ).raise_for_status()
        self.patients[study.patient_id] = patient_id

    def reported(self, pending: Sequence[str]) -> set[str]:
        """Which of the ``pending`` PatientIDs now have a DiagnosticReport. Polls a count (no
        report bodies, which carry the PDF); asks per patient only when the count moved."""
        count = self._count({})
        if count == self._reports:
            return set()
        self._reports = count
        found: set[str] = set()
        for patient_id in pending:
            if self._count({"subject": f"Patient/{self.patients[patient_id]}"}):
                found.add(patient_id)
        return found

    def _count(self, params: dict[str, str]) -> int:
        url = f"{self.base}/DiagnosticReport"
        response = self.client.get(url, params={**params, "_summary": "count"})
        response.raise_for_status()
        return int(response.json().get("total", 0))


class Pacs:
    """Orthanc (tests/orthanc.py) as the destination PACS; counts one study's instances."""

    def __init__(self, folder: Path) -> None:
        self.orthanc = OrthancProcess(folder, http_port=free_port(), dicom_port=free_port())
        self.client = httpx.Client(timeout=10)
        self.ids: dict[str, str] = {}

    def start(self) -> Pacs:
        self.orthanc.start(timeout=START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        self.orthanc.stop()
        self.client.close()

    def count(self, study_uid: str) -> int:
        url = self.orthanc.url
        if study_uid not in self.ids:
            found = self.client.post(f"{url}/tools/lookup", content=study_uid).json()
            studies = [f["ID"] for f in found if f["Type"] == "Study"]
            if not studies:
                return 0
            self.ids[study_uid] = studies[0]
        stats = self.client.get(f"{url}/studies/{self.ids[study_uid]}/statistics").json()
        return int(stats["CountInstances"])

    def holds(self, sop_instance_uids: Sequence[str]) -> bool:
        """Whether Orthanc holds every one of these instances."""
        for uid in sop_instance_uids:
            found = self.client.post(f"{self.orthanc.url}/tools/lookup", content=uid).json()
            if not any(f["Type"] == "Instance" for f in found):
                return False
        return True


# --------------------------------------------------------------------------------------------
# The node


class Node:
    """``pacs-node serve`` with a config folder written here; its catalog read read-only."""

    def __init__(
        self,
        folder: Path,
        model: str,
        pacs: Pacs,
        fhir: FhirServer,
        quiet: float,
        options: dict[str, Any] | None = None,
    ):
        self.folder = folder
        self.options = options or {}  # node.yaml keys over the shipped defaults
        self.model = model
        self.pacs = pacs
        self.fhir = fhir
        self.quiet = quiet
        self.port = free_port()
        self.config_dir = folder / "ae_config"
        self.data_dir = folder / "var"
        self.log_path = folder / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        return str(Path(sys.executable).parent / "pacs-node")

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        node = {
            "ae_title": NODE_AE,
            "dicom_host": "127.0.0.1",
            "dicom_port": self.port,
            "web_host": "127.0.0.1",
            "web_port": free_port(),
            "data_dir": str(self.data_dir),
            "models_dir": str(ROOT / "models"),
            "quiet_period_s": self.quiet,
            "min_free_mb": 0,
            **self.options,
        }
        peers = {
            "peers": [
                *({"ae_title": ae, "host": "127.0.0.1"} for ae in SCANNERS),
                {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.pacs.orthanc.dicom_port},
            ],
            "destinations": {
                PACS: {"type": "dimse", "peer": "ORTHANC"},
                EHR: {"type": "fhir", "base_url": self.fhir.base},
            },
        }
        routes = {
            "rules": [
                {
                    "name": "ct-bench",
                    "description": "every axial CT of the benchmark",
                    "when": {"modality": "CT", "slices": {"min": 20}},
                    "select": "thinnest",
                    "models": [self.model],
                    "send": {**{kind: [PACS] for kind in DICOM_KINDS}, "fhir": [EHR]},
                    # the results go out whatever the gate says (named in them when it fails):
                    # this measures time to the PACS, and the bench's short synthetic study
                    # lies outside the models' size ranges
                    "qa": "flag",
                }
            ]
        }
        for name, content in (("node", node), ("peers", peers), ("routes", routes)):
            (self.config_dir / f"{name}.yaml").write_text(yaml.safe_dump(content, sort_keys=False))

    def start(self) -> Node:
        self.write_config()
        self.cli("routes", "check")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.executable(), "serve", "--config", str(self.config_dir)],
                env=dicom_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited at start:\n{tail(self.log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(listening, START_TIMEOUT_S, "the node's DICOM port", 0.1)
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [self.executable(), *args, "--config", str(self.config_dir)],
            env=dicom_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=180,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pacs-node {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def first_results(self, study_uid: str) -> list[str] | None:
        """SOP Instance UIDs of the study's SEG and SR queued for PACS, once both are (they
        are committed before the job's other results); None before."""
        path = self.data_dir / "catalog.sqlite"
        if not path.exists():
            return None
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            ) as db:
                rows = db.execute(
                    "SELECT r.kind, r.sop_instance_uid FROM results r"
                    " JOIN deliveries d ON d.result_id = r.id"
                    " JOIN jobs j ON j.id = r.job_id JOIN studies s ON s.id = j.study_id"
                    " WHERE s.study_uid = ? AND d.destination = ? AND r.kind IN ('seg', 'sr')",
                    (study_uid, PACS),
                ).fetchall()
        except sqlite3.Error:
            return None
        if {kind for kind, _uid in rows} != {"seg", "sr"}:
            return None
        return [uid for _kind, uid in rows]

    def expected(self, study_uid: str) -> int | None:
        """DICOM results queued for PACS once the study's job is done; None before. Raises if
        the job failed or a delivery is dead or held."""
        path = self.data_dir / "catalog.sqlite"
        if not path.exists():
            return None
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            ) as db:
                jobs = db.execute(
                    "SELECT j.id, j.state, j.error FROM jobs j JOIN studies s ON s.id = j.study_id"
                    " WHERE s.study_uid = ?",
                    (study_uid,),
                ).fetchall()
                if not jobs:
                    return None
                for _id, state, error in jobs:
                    if state in ("failed", "cancelled"):
                        raise RuntimeError(f"job {state}: {error}\n{tail(self.log_path)}")
                if any(state != "done" for _id, state, _e in jobs):
                    return None
                ids = [job_id for job_id, _s, _e in jobs]
                marks = ",".join("?" * len(ids))
                bad = db.execute(
                    "SELECT destination, state, last_error FROM deliveries"
                    f" WHERE job_id IN ({marks}) AND state IN ('dead', 'held')",
                    ids,
                ).fetchall()
                if bad:
                    raise RuntimeError(f"deliveries not delivered: {bad}\n{tail(self.log_path)}")
                row = db.execute(
                    f"SELECT count(*) FROM deliveries WHERE job_id IN ({marks})"
                    " AND destination = ?",
                    [*ids, PACS],
                ).fetchone()
                return int(row[0])
        except sqlite3.Error:
            return None


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Track:
    """One study on its way: when it was acknowledged and when each destination had it."""

    study: Study
    scanner: str
    acked_at: float = 0.0
    expected: int | None = None
    first_at: float | None = None  # the SEG and SR in Orthanc
    pacs_at: float | None = None
    ehr_at: float | None = None

    @property
    def done(self) -> bool:
        return self.pacs_at is not None and self.ehr_at is not None


def follow(node: Node, tracks: Sequence[Track], timeout_s: float = RESULT_TIMEOUT_S) -> None:
    """Poll Orthanc, the FHIR server and (for the count to expect) the catalog until every
    acknowledged study is complete in both; stamps each arrival."""
    deadline = time.monotonic() + timeout_s
    last_fhir = 0.0
    while True:
        now = time.time()
        pending = [t for t in tracks if t.acked_at and not t.done]
        for track in pending:
            if track.first_at is None:
                first = node.first_results(track.study.uid)
                if first and node.pacs.holds(first):
                    track.first_at = now
            if track.pacs_at is None:
                if track.expected is None:
                    track.expected = node.expected(track.study.uid)
                if track.expected and node.pacs.count(track.study.uid) >= track.expected:
                    track.pacs_at = now
                    if track.first_at is None:  # both came within one poll
                        track.first_at = now
        if any(t.ehr_at is None for t in pending) and now - last_fhir >= 2 * POLL_S:
            last_fhir = now
            waiting = [t for t in pending if t.ehr_at is None]
            reported = node.fhir.reported([t.study.patient_id for t in waiting])
            for track in waiting:
                if track.study.patient_id in reported:
                    track.ehr_at = now
        if all(t.done for t in tracks):
            return
        if time.monotonic() > deadline:
            missing = [t.study.uid for t in tracks if not t.done]
            raise TimeoutError(f"results missing after {timeout_s:.0f} s: {missing}")
        time.sleep(POLL_S)


STAGES = (
    ("quiet", "quiet period (excluded)"),
    ("routing", "routing (stable -> job queued)"),
    ("queue", "queue wait (queued -> claimed)"),
    ("decode", "job: decode"),
    ("infer", "job: inference (load + pre + infer + post)"),
    ("build", "job: build results"),
    ("store", "job: store results + outbox rows"),
    ("job_other", "job: other"),
    ("deliver_pacs", "delivery to Orthanc (job done -> all stored)"),
    ("deliver_ehr", "delivery to FHIR (job done -> report accepted)"),
    ("to_pacs", "last ack -> all results in Orthanc, minus quiet"),
    ("to_ehr", "last ack -> report in FHIR, minus quiet"),
    ("first_result", "first result: last ack -> SEG and SR in Orthanc, minus quiet"),
    ("total", "total beyond the quiet period"),
)


def stages(node: Node, track: Track) -> dict[str, Any]:
    """The split of one study's latency, from the node's own records."""
    study = next(s for s in node.cli_json("studies") if s["study_uid"] == track.study.uid)
    jobs = [j for j in node.cli_json("jobs") if j["study_uid"] == track.study.uid]
    if len(jobs) != 1:
        raise RuntimeError(f"expected one job for the study, found {len(jobs)}")
    job = jobs[0]
    timings: dict[str, float] = job["timings"]
    stable = stamp(study["stable_at"])
    created, started = stamp(job["created_at"]), stamp(job["started_at"])
    finished = stamp(job["finished_at"])
    if not (stable and created and started and finished and track.pacs_at and track.ehr_at):
        raise RuntimeError(f"incomplete records for study {track.study.uid}: {study} {job}")
    if track.first_at is None:
        raise RuntimeError(f"the SEG and SR of study {track.study.uid} were not seen in Orthanc")
    infer = sum(timings.get(k, 0.0) for k in ("load_s", "preprocess_s", "infer_s", "postprocess_s"))
    counted = sum(v for k, v in timings.items() if k not in ("queued_s", "total_s"))
    quiet = stable - track.acked_at
    values = {
        "quiet": quiet,
        "routing": created - stable,
        "queue": started - created,
        "decode": timings.get("decode_s", 0.0),
        "infer": infer,
        "build": timings.get("build_s", 0.0),
        "store": timings.get("store_s", 0.0),
        "job_other": max(0.0, (finished - started) - counted),
        "deliver_pacs": track.pacs_at - finished,
        "deliver_ehr": track.ehr_at - finished,
        "to_pacs": track.pacs_at - track.acked_at - quiet,
        "to_ehr": track.ehr_at - track.acked_at - quiet,
        "first_result": track.first_at - track.acked_at - quiet,
        "total": max(track.pacs_at, track.ehr_at) - track.acked_at - quiet,
    }
    deliveries = [d for d in node.cli_json("deliveries") if d["job_id"] == job["id"]]
    return {
        "study_uid": track.study.uid,
        "seconds": {k: round(v, 3) for k, v in values.items()},
        "job_timings": timings,
        "results_in_pacs": track.expected,
        "deliveries": [
            {k: d[k] for k in ("destination", "kind", "state", "attempts", "delivered_at")}
            for d in deliveries
        ],
    }


@dataclass
class ModelResult:
    model: str
    latency_runs: list[dict[str, Any]] = field(default_factory=list)
    latency_median: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    # --throughput-setups: label ("2x1": job workers x torch threads) -> a throughput run
    throughput_setups: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """Job worker processes x torch threads each (0: the node's default share of the cores)."""

    job_workers: int
    torch_threads: int

    @property
    def label(self) -> str:
        return f"{self.job_workers}x{self.torch_threads}"

    @property
    def options(self) -> dict[str, int]:
        return {"job_workers": self.job_workers, "torch_threads": self.torch_threads}

    @classmethod
    def parse(cls, text: str) -> Setup:
        workers, sep, threads = text.strip().partition("x")
        if not (sep and workers.isdigit() and threads.isdigit()):
            raise ValueError(f"{text!r}: expected WORKERSxTHREADS, e.g. 2x1")
        setup = cls(int(workers), int(threads))
        if not 1 <= setup.job_workers <= 32:
            raise ValueError(f"{text!r}: job workers must be 1 to 32")
        return setup


class Bench:
    """One model's measurements with fresh peers and a fresh node."""

    def __init__(self, args: argparse.Namespace, base: Path, template: list[Dataset]) -> None:
        self.args = args
        self.base = base
        self.template = template
        self.index = 0

    def next_study(self, template: list[Dataset] | None = None) -> Study:
        self.index += 1
        folder = self.base / "studies" / f"study{self.index:03d}"
        return write_study(template or self.template, folder, self.index)

    def run(self, model: str) -> ModelResult:
        folder = self.base / model
        result = ModelResult(model)
        pacs = Pacs(folder / "orthanc")
        fhir = FhirServer(folder / "fhir")
        node = Node(folder / "node", model, pacs, fhir, self.args.quiet_period_s)
        try:
            pacs.start()
            fhir.start()
            node.start()
            self.warm_up(node)
            for run in range(self.args.runs):
                measured = self.latency(node, folder)
                result.latency_runs.append(measured)
                s = measured["seconds"]
                print(
                    f"{model} run {run + 1}/{self.args.runs}: total {s['total']:.1f} s, first "
                    f"result {s['first_result']:.1f} s beyond quiet {s['quiet']:.1f} s"
                    f" (infer {s['infer']:.1f}, build {s['build']:.1f},"
                    f" PACS {s['to_pacs']:.1f}, EHR {s['to_ehr']:.1f}; load {measured['load']})",
                    file=sys.stderr,
                )
            result.latency_median = {
                key: round(statistics.median(r["seconds"][key] for r in result.latency_runs), 2)
                for key, _label in STAGES
            }
            if not self.args.throughput_setups:
                result.throughput = self.throughput(node, folder)
                self.report_throughput(model, "as shipped", result.throughput)
            for setup in self.args.throughput_setups:
                # a fresh node per setup (same peers), warmed up with one study per worker
                node.stop()
                node = Node(
                    folder / f"node-{setup.label}",
                    model,
                    pacs,
                    fhir,
                    self.args.quiet_period_s,
                    setup.options,
                ).start()
                self.warm_up(node, count=setup.job_workers)
                measured = self.throughput(node, folder)
                measured["setup"] = setup.options
                result.throughput_setups[setup.label] = measured
                result.throughput = result.throughput or measured
                self.report_throughput(model, setup.label, measured)
        except BaseException:
            print(f"node log tail:\n{tail(node.log_path)}", file=sys.stderr)
            raise
        finally:
            node.stop()
            fhir.stop()
            pacs.stop()
        return result

    def warm_up(self, node: Node, count: int = 1) -> None:
        """Small studies first (``count``: one per job worker, sent together), so the job
        workers have imported their code and loaded the model."""
        tracks = []
        for _ in range(count):
            study = self.next_study(self.template[:24])
            node.fhir.seed(study)
            tracks.append(Track(study, SCANNERS[0]))
        for track in tracks:
            log = self.base / "storescu-warmup.log"
            storescu(node.port, track.scanner, track.study.files, log)
            track.acked_at = time.time()
        follow(node, tracks)

    @staticmethod
    def report_throughput(model: str, setup: str, tp: dict[str, Any]) -> None:
        print(
            f"{model} throughput ({setup}): {tp['studies']} studies in {tp['seconds']:.1f} s = "
            f"{tp['studies_per_hour']:.0f} studies/h (load {tp['load']})",
            file=sys.stderr,
        )

    def latency(self, node: Node, folder: Path) -> dict[str, Any]:
        study = self.next_study()
        node.fhir.seed(study)
        track = Track(study, SCANNERS[0])
        before = load()
        storescu(node.port, track.scanner, study.files, folder / "storescu-latency.log")
        track.acked_at = time.time()
        follow(node, [track])
        measured = stages(node, track)
        measured["load"] = {"before": before, "after": load()}
        shutil.rmtree(study.files[0].parent, ignore_errors=True)
        return measured

    def throughput(self, node: Node, folder: Path) -> dict[str, Any]:
        studies = [self.next_study() for _ in range(self.args.studies)]
        for study in studies:
            node.fhir.seed(study)
        tracks = [Track(s, SCANNERS[i % len(SCANNERS)]) for i, s in enumerate(studies)]
        errors: list[BaseException] = []

        def scanner(name: str) -> None:
            try:
                for track in (t for t in tracks if t.scanner == name):
                    log = folder / f"storescu-{name}.log"
                    storescu(node.port, name, track.study.files, log)
                    track.acked_at = time.time()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=scanner, args=(name,)) for name in SCANNERS]
        before = load()
        start = time.time()
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads):
                if errors:
                    raise errors[0]
                follow_some(node, tracks)
                time.sleep(POLL_S)
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            last_ack = max(t.acked_at for t in tracks)
            follow(node, tracks)
        finally:
            for thread in threads:
                thread.join()
        end = max(max(t.pacs_at or 0.0, t.ehr_at or 0.0) for t in tracks)
        seconds = end - start
        per_study = [max(t.pacs_at or 0.0, t.ehr_at or 0.0) - t.acked_at for t in tracks]
        for study in studies:
            shutil.rmtree(study.files[0].parent, ignore_errors=True)
        return {
            **self.job_split(node, studies),
            "studies": len(studies),
            "scanners": list(SCANNERS),
            "instances": sum(len(s.files) for s in studies),
            "bytes": sum(s.bytes for s in studies),
            "seconds": round(seconds, 2),
            "sending_s": round(last_ack - start, 2),
            "after_last_ack_s": round(end - last_ack, 2),
            "studies_per_hour": round(len(studies) / seconds * 3600, 1),
            "per_study_ack_to_done_s": [round(v, 2) for v in per_study],
            "load": {"before": before, "after": load()},
        }

    @staticmethod
    def job_split(node: Node, studies: Sequence[Study]) -> dict[str, Any]:
        """The throughput run's jobs from the node's records: seconds summed over the jobs per
        stage (decode, infer, build, store; what overlaps between workers is counted in each),
        and the job wall time per study."""
        uids = {s.uid for s in studies}
        jobs = [j for j in node.cli_json("jobs") if j["study_uid"] in uids]
        keys = {
            "decode": ("decode_s",),
            "infer": ("load_s", "preprocess_s", "infer_s", "postprocess_s"),
            "build": ("build_s",),
            "store": ("store_s",),
        }
        split = {
            stage: round(sum(j["timings"].get(k, 0.0) for j in jobs for k in names), 2)
            for stage, names in keys.items()
        }
        walls = [
            (stamp(j["finished_at"]) or 0.0) - (stamp(j["started_at"]) or 0.0)
            for j in jobs
            if j["finished_at"] and j["started_at"]
        ]
        return {
            "jobs": len(jobs),
            "job_stage_sum_s": split,
            "job_wall_sum_s": round(sum(walls), 2),
            "job_wall_median_s": round(statistics.median(walls), 2) if walls else None,
        }


def follow_some(node: Node, tracks: Sequence[Track]) -> None:
    """One non-blocking pass of :func:`follow` while studies are still being sent."""
    with contextlib.suppress(TimeoutError):
        follow(node, [t for t in tracks if t.acked_at], timeout_s=0.0)


# --------------------------------------------------------------------------------------------
# Report


def markdown(results: list[ModelResult], slices: int, runs: int, quiet: float) -> str:
    models = [r.model for r in results]
    title = (
        f"{slices}-slice 512x512 CT (phantom), storescu -> node -> Orthanc (DIMSE) + FHIR server,"
        f" quiet period {quiet:g} s, median of {runs} run(s), seconds"
    )
    lines = [
        title,
        "",
        "| stage | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for key, label in STAGES:
        cells = [f"{r.latency_median[key]:.1f}" for r in results]
        if key == "total":
            cells = [f"**{c}**" for c in cells]
        name = f"**{label}**" if key == "total" else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    verdict = [f"{'met' if r.latency_median['total'] < TARGET_S else 'NOT met'}" for r in results]
    lines.append(f"| target < {TARGET_S:.0f} s beyond quiet | " + " | ".join(verdict) + " |")
    lines += ["", "| throughput | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("studies (2 scanners, back to back)", lambda t: f"{t['studies']}"),
        ("first C-STORE -> all results in both, s", lambda t: f"{t['seconds']:.0f}"),
        ("  of which sending, s", lambda t: f"{t['sending_s']:.0f}"),
        ("**studies/hour**", lambda t: f"**{t['studies_per_hour']:.0f}**"),
        (
            "per study, own last ack -> done, median s",
            lambda t: f"{statistics.median(t['per_study_ack_to_done_s']):.0f}",
        ),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r.throughput) for r in results) + " |")
    for setup in results[0].throughput_setups if results else {}:
        workers, threads = setup.split("x")
        label = f"studies/hour, {workers} job worker(s) x {'auto' if threads == '0' else threads}"
        cells = [f"{r.throughput_setups[setup]['studies_per_hour']:.0f}" for r in results]
        lines.append(f"| {label} torch threads | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import pydicom
    import pynetdicom

    from pacs_node import __version__ as pacs_node_version

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average_at_start": load(),
        "busiest_processes_at_start": busiest_processes(),
        "python": sys.version.split()[0],
        "versions": {
            "pacs-node": pacs_node_version,
            "pydicom": pydicom.__version__,
            "pynetdicom": pynetdicom.__version__,
            "dcmtk": tool_version([STORESCU, "--version"]),
            "orthanc": tool_version([ORTHANC, "--version"]),
            "sekmet": tool_version([str(SEKMET), "--version"]),
        },
    }


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--slices", type=int, default=120, help="CT slices per study (120)")
    parser.add_argument("--runs", type=int, default=3, help="latency runs per model (3)")
    parser.add_argument("--studies", type=int, default=10, help="studies in the throughput run")
    parser.add_argument("--quiet-period-s", type=float, default=2.0, help="node quiet period")
    parser.add_argument("--small", action="store_true", help="40 slices, 1 run, 4 studies")
    parser.add_argument("--models", default=",".join(MODELS), help="subset of " + ", ".join(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="base folder (system temp)")
    parser.add_argument(
        "--throughput-setups",
        default="",
        help="compare throughput over job_workers x torch_threads settings, each on a fresh "
        "node, e.g. 1x2,2x1 (0 threads: the node's default); default: one run as shipped",
    )
    args = parser.parse_args(argv)
    try:
        setups = [Setup.parse(s) for s in args.throughput_setups.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(f"--throughput-setups {exc}")
    if len({s.label for s in setups}) != len(setups):
        parser.error("--throughput-setups: each setup once")
    args.throughput_setups = setups
    if args.small:
        args.slices, args.runs, args.studies = 40, 1, 4
    if args.slices < 24 or args.runs < 1 or args.studies < len(SCANNERS):
        parser.error("need --slices >= 24, --runs >= 1, --studies >= 2")
    return args


def available(models: Sequence[str]) -> list[str]:
    return [m for m in models if (ROOT / "models" / m / "configs" / "metadata.json").is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (STORESCU, ORTHANC, str(SEKMET)):
        if not Path(tool).exists():
            print(f"missing {tool}", file=sys.stderr)
            return 2
    models = available(args.models.split(","))
    if not models:
        print("no model bundle found for " + args.models, file=sys.stderr)
        return 2
    info = machine_info()
    results: list[ModelResult] = []
    with work_dir(args.work_dir, "pacs-node-e2e-") as base:
        print(f"rendering a {args.slices}-slice 512x512 phantom CT ...", file=sys.stderr)
        template = render_template(args.slices)
        bench = Bench(args, base, template)
        for model in models:
            results.append(bench.run(model))
    table = markdown(results, args.slices, args.runs, args.quiet_period_s)
    print(table)
    report = {
        "benchmark": "e2e",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/e2e.py", *(argv or sys.argv[1:])]),
        "machine": {**info, "load_average_at_end": load()},
        "settings": {
            "slices": args.slices,
            "rows": MATRIX,
            "columns": MATRIX,
            "thickness_mm": THICKNESS_MM,
            "runs": args.runs,
            "throughput_studies": args.studies,
            "throughput_setups": [s.options for s in args.throughput_setups],
            "quiet_period_s": args.quiet_period_s,
            "outputs": {PACS: list(DICOM_KINDS), EHR: ["fhir"]},
            "node": "pacs-node serve as shipped: 2 SCP processes, job_workers auto, SQLite",
        },
        "target_s": TARGET_S,
        "target_met": {r.model: r.latency_median["total"] < TARGET_S for r in results},
        "stages": dict(STAGES),
        "models": [asdict(r) for r in results],
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
