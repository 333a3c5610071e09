"""Ingest benchmark: how fast pacs-node takes C-STOREs, next to dcmtk storescp and Orthanc.

What it does
------------
1. Writes N synthetic 512x512 16-bit CT slices (one series, consistent geometry, explicit VR little
   endian, a realistic header) into a temporary folder once.
2. For every run, every target and both loads it starts a *fresh* receiver on 127.0.0.1 on a free
   port, with its data folder under one base folder (same disk for all), sends the N files with
   dcmtk ``/usr/bin/storescu`` (the same sender for every target) and measures the wall time from
   starting the first storescu to the moment the receiver has all N instances:

   - load ``1 assoc``: one storescu, one association, N instances;
   - load ``4 assoc``: the files split into 4 parts sent by 4 storescu processes at once.

   "Has all N" is checked after the senders have exited (every instance was acknowledged by then)
   by polling the receiver with a deadline: pacs-node's catalog (``SELECT count(*) FROM instances``
   on its SQLite file, read-only; the catalog row follows the fsync'd ack), Orthanc's REST
   ``/statistics``, storescp's output folder. Receivers are started before the clock starts and
   stopped after, so start-up is not counted.
3. Reports instances/s and MB/s (1 MB = 10^6 bytes of DICOM files sent), the median of ``--runs``
   runs, and the ratios pacs-node/storescp and pacs-node/Orthanc as the median of the per-run
   ratios (runs interleave targets, so a ratio compares measurements taken seconds apart; the
   noise between runs on a shared machine is much larger than within one).

Targets
-------
- ``pacs-node``: ``pacs-node serve`` as shipped (fsync of every file and its directory before the
  ack, SQLite catalog in WAL mode, rows written in batches by the recorder thread).
- ``storescp``: dcmtk ``storescp +B -od DIR`` (bit-preserving, writes each file, no fsync), in
  single-process mode for one association and ``--fork`` for four.
- ``Orthanc``: with its own JSON config (plugins off, storage and index in the temp folder,
  ``SyncStorageArea`` true as shipped: it fsyncs too, ``DicomThreadsCount`` 4 as shipped).
  Orthanc 1.10 cannot bind its DICOM port to one address; it listens on all interfaces, the
  HTTP port answers only loopback (``RemoteAccessAllowed`` false).

dcmtk and Orthanc get ``TCP_NODELAY=1`` in their environment (so does storescu); without it each
C-STORE waits ~40 ms for a delayed ACK.

The shares of fsync and of the catalog in pacs-node's time
----------------------------------------------------------
Measured as variants, run interleaved with the others, so the share is the time the work costs
on the critical path (including GIL contention), not only its CPU:

- ``pacs-node, no fsync``: the shipped node with ``PACS_NODE_FSYNC=false``.
  fsync share = 1 - t(no fsync) / t(shipped).
- ``pacs-node, no catalog``: the shipped node started by this script's ``--serve-no-catalog``
  entry, which replaces ``CatalogRecorder.submit`` with a no-op before ``pacs-node serve`` runs
  (the spool write, fsync and the ack are unchanged; no rows, no assembly timers). Completion is
  then the spool's file count. catalog share = 1 - t(no catalog) / t(shipped).

Both shares are medians of per-run values and are reported per load.

Usage: ``python bench/ingest.py [--n 300] [--runs 3] [--assocs 4] [--out FILE.json]``
(default output: ``bench/results/ingest.json``; ``--targets`` picks a subset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from common import dicom_env, free_port, stop_process, tool_version, wait_until, work_dir

ROOT = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
CALLING_AE = "BENCHSCU"
START_TIMEOUT_S = 60.0
STORE_TIMEOUT_S = 600.0
POLL_S = 0.005


# --------------------------------------------------------------------------------------------
# Data


def generate_series(folder: Path, n: int) -> list[Path]:
    """N CT slices of one series: 512x512 uint16, 1 mm slices, explicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    yy, xx = np.mgrid[-256:256, -256:256]
    body = (xx / 200.0) ** 2 + (yy / 150.0) ** 2 <= 1.0
    base = np.where(body, 1024 + 40, 1024 - 1000).astype(np.int32)  # stored = HU + 1024
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime(2024, 6, 7, 9, 30, 0)
    paths: list[Path] = []
    for index in range(n):
        lung = ((xx - 90) / 60.0) ** 2 + (yy / 90.0) ** 2 <= 1.0 + 0.2 * np.sin(index / 20)
        lung |= ((xx + 90) / 60.0) ** 2 + (yy / 90.0) ** 2 <= 1.0 + 0.2 * np.cos(index / 20)
        pixels = np.where(lung & body, 1024 - 850, base)
        pixels = pixels + rng.normal(0, 12, size=pixels.shape).astype(np.int32)
        pixels = np.clip(pixels, 0, 4095).astype(np.uint16)

        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240607"
        ds.StudyTime = ds.SeriesTime = "093000"
        ds.AcquisitionTime = ds.ContentTime = f"0930{index % 60:02d}"
        ds.AccessionNumber = "BENCH0001"
        ds.Modality = "CT"
        ds.Manufacturer = "pacs-node bench"
        ds.InstitutionName = "Bench Hospital"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StationName = "CT01"
        ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
        ds.SeriesDescription = "Axial 1.0 mm"
        ds.ManufacturerModelName = "Synthetic"
        ds.PatientName = "Bench^Patient"
        ds.PatientID = "BENCH-0001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.PatientAge = "064Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500.0"
        ds.ReconstructionDiameter = "400.0"
        ds.GantryDetectorTilt = "0.0"
        ds.TableHeight = "150.0"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "200"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = ["-200.0", "-200.0", f"{-index * 1.0:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{-index * 1.0:.1f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 512
        ds.Columns = 512
        ds.PixelSpacing = ["0.78125", "0.78125"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        path = folder / f"CT{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Processes and waits


def echo_ok(ae_title: str, port: int) -> bool:
    result = subprocess.run(
        [ECHOSCU, "-to", "2", "-aet", CALLING_AE, "-aec", ae_title, "127.0.0.1", str(port)],
        env=dicom_env(),
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


# --------------------------------------------------------------------------------------------
# Receivers


class Receiver:
    """A receiver started fresh in ``folder``; ``count()`` says how many instances it holds."""

    name = "receiver"
    ae_title = "ANY"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "receiver.log"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create folders and config files before the process starts."""

    def ready(self) -> bool:
        return echo_ok(self.ae_title, self.port)

    def count(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prepare()
        argv, env = self.command()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}:\n{self.log}")
            return self.ready()

        wait_until(up, START_TIMEOUT_S, f"{self.name} to answer C-ECHO", 0.1)

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def _count_files(folder: Path, suffix: str) -> int:
    total = 0
    for _dirpath, _dirs, files in os.walk(folder):
        total += sum(1 for name in files if name.endswith(suffix))
    return total


class PacsNode(Receiver):
    name = "pacs-node"
    ae_title = "PACSNODE"

    def __init__(self, folder: Path, *, fsync: bool = True, catalog: bool = True) -> None:
        super().__init__(folder)
        self.fsync = fsync
        self.catalog = catalog
        self.data_dir = folder / "data"
        self.config_dir = folder / "config"  # empty: embedded defaults + env + options

    def prepare(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def executable() -> str:
        return str(Path(sys.executable).parent / "pacs-node")

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PACS_NODE_")}
        env["PACS_NODE_DATA_DIR"] = str(self.data_dir)
        env["PACS_NODE_FSYNC"] = "true" if self.fsync else "false"
        env["PACS_NODE_WEB_PORT"] = str(free_port())
        return env

    def command(self) -> tuple[list[str], dict[str, str]]:
        options = [
            "serve",
            "--config",
            str(self.config_dir),
            "--data-dir",
            str(self.data_dir),
            "--dicom-host",
            "127.0.0.1",
            "--dicom-port",
            str(self.port),
            "--promiscuous",
            "--quiet-period-s",
            "5",
        ]
        if self.catalog:
            return [self.executable(), *options], self.env()
        return [sys.executable, str(Path(__file__).resolve()), "--serve-no-catalog", *options], (
            self.env()
        )

    def count(self) -> int:
        if not self.catalog:
            return _count_files(self.data_dir / "spool", ".dcm")
        path = self.data_dir / "catalog.sqlite"
        if not path.exists():
            return 0
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            ) as db:
                return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
        except sqlite3.Error:
            return 0

    def studies_json(self) -> Any:
        """``pacs-node studies --json`` as a user would run it (used once, outside the clock)."""
        result = subprocess.run(
            [self.executable(), "studies", "--json", "--config", str(self.config_dir)],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return json.loads(result.stdout)


class StoreSCP(Receiver):
    name = "storescp"
    ae_title = "STORESCP"

    def __init__(self, folder: Path, *, fork: bool) -> None:
        super().__init__(folder)
        self.fork = fork
        self.out = folder / "out"

    def prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv = [STORESCP, "+B", "-od", str(self.out), "-aet", self.ae_title, "-dhl"]
        if self.fork:
            argv.append("--fork")
        return [*argv, str(self.port)], dicom_env()

    def count(self) -> int:
        return sum(1 for entry in os.scandir(self.out) if entry.is_file())


class Orthanc(Receiver):
    name = "Orthanc"
    ae_title = "ORTHANC"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.http_port = free_port()
        self.config = folder / "orthanc.json"

    def prepare(self) -> None:
        config = {
            "Name": "pacs-node-bench",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "StorageCompression": False,
            "SaveJobs": False,
        }
        self.config.write_text(json.dumps(config, indent=2))

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [ORTHANC, str(self.config)], dicom_env()

    def ready(self) -> bool:
        try:
            self._get("/system")
        except OSError:
            return False
        return super().ready()

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


# --------------------------------------------------------------------------------------------
# Sending and measuring


@dataclass
class Measurement:
    target: str
    load: str
    run: int
    instances: int
    bytes: int
    seconds: float
    send_seconds: float

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds


def split(paths: Sequence[Path], parts: int) -> list[list[Path]]:
    size = -(-len(paths) // parts)
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def send(receiver: Receiver, parts: list[list[Path]], work: Path) -> tuple[float, float]:
    """Send every part with its own storescu at once; seconds to all-sent and to all-stored."""
    total = sum(len(part) for part in parts)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [work / f"storescu-{i}.log" for i in range(len(parts))]
    start = time.perf_counter()
    try:
        for part, log_path in zip(parts, logs, strict=True):
            argv = [STORESCU, "-aet", CALLING_AE, "-aec", receiver.ae_title, "-R"]
            argv += ["127.0.0.1", str(receiver.port), *map(str, part)]
            with log_path.open("wb") as log:
                procs.append(
                    subprocess.Popen(argv, env=dicom_env(), stdout=log, stderr=subprocess.STDOUT)
                )
        deadline = start + STORE_TIMEOUT_S
        for proc in procs:
            proc.wait(max(0.1, deadline - time.perf_counter()))
        sent = time.perf_counter() - start
        failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
        if failed:
            detail = logs[failed[0]].read_text(errors="replace")[-2000:]
            raise RuntimeError(f"storescu to {receiver.name} failed:\n{detail}\n{receiver.log}")
        wait_until(
            lambda: receiver.count() >= total,
            max(1.0, deadline - time.perf_counter()),
            f"{receiver.name} to hold {total} instances",
            POLL_S,
        )
        return sent, time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass
class Target:
    key: str
    label: str
    make: Callable[[Path, int], Receiver]
    variant: bool = False  # a pacs-node variant that measures a share, not a comparison


TARGETS = [
    Target("pacs-node", "pacs-node (fsync on, as shipped)", lambda d, _a: PacsNode(d)),
    Target("storescp", "dcmtk storescp", lambda d, a: StoreSCP(d, fork=a > 1)),
    Target("orthanc", "Orthanc", lambda d, _a: Orthanc(d)),
    Target(
        "pacs-node-nofsync",
        "pacs-node, PACS_NODE_FSYNC=false",
        lambda d, _a: PacsNode(d, fsync=False),
        variant=True,
    ),
    Target(
        "pacs-node-nocatalog",
        "pacs-node, no catalog rows",
        lambda d, _a: PacsNode(d, catalog=False),
        variant=True,
    ),
]


def measure(
    target: Target, files: list[Path], size: int, assocs: int, run: int, base: Path
) -> Measurement:
    folder = Path(tempfile.mkdtemp(prefix=f"{target.key}-a{assocs}-r{run}-", dir=base))
    receiver = target.make(folder, assocs)
    try:
        receiver.start()
        sent_s, stored_s = send(receiver, split(files, assocs), folder)
        if isinstance(receiver, PacsNode) and receiver.catalog and run == 0:
            studies = receiver.studies_json()
            held = sum(study["instances"] for study in studies)
            if held != len(files):
                raise RuntimeError(f"pacs-node studies --json shows {held} of {len(files)}")
    finally:
        receiver.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return Measurement(
        target=target.key,
        load=f"{assocs} assoc",
        run=run,
        instances=len(files),
        bytes=size,
        seconds=stored_s,
        send_seconds=sent_s,
    )


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Summary:
    target: str
    label: str
    load: str
    per_s: float
    mb_per_s: float
    runs_per_s: list[float] = field(default_factory=list)


def _per_run(results: list[Measurement], target: str, load: str) -> dict[int, Measurement]:
    return {m.run: m for m in results if m.target == target and m.load == load}


def ratio(results: list[Measurement], load: str, top: str, bottom: str) -> float | None:
    """Median over runs of throughput(top) / throughput(bottom) measured in the same run."""
    a, b = _per_run(results, top, load), _per_run(results, bottom, load)
    values = [a[run].per_s / b[run].per_s for run in sorted(a.keys() & b.keys())]
    return statistics.median(values) if values else None


def share(results: list[Measurement], load: str, variant: str) -> float | None:
    """Median over runs of 1 - t(variant) / t(shipped pacs-node)."""
    full, other = _per_run(results, "pacs-node", load), _per_run(results, variant, load)
    values = [1 - other[run].seconds / full[run].seconds for run in sorted(full.keys() & other)]
    return statistics.median(values) if values else None


def summarise(results: list[Measurement], loads: list[str]) -> list[Summary]:
    rows = []
    for load in loads:
        for target in TARGETS:
            runs = sorted(_per_run(results, target.key, load).values(), key=lambda m: m.run)
            if not runs:
                continue
            rows.append(
                Summary(
                    target=target.key,
                    label=target.label,
                    load=load,
                    per_s=statistics.median(m.per_s for m in runs),
                    mb_per_s=statistics.median(m.mb_per_s for m in runs),
                    runs_per_s=[round(m.per_s, 1) for m in runs],
                )
            )
    return rows


# What the node is meant to reach against Orthanc (pacs-node / Orthanc, instances/s).
GOAL_ONE_ASSOC = 1.0
GOAL_PARALLEL, AIM_PARALLEL = 1.0, 1.5


def goal(load: str) -> str:
    """The goal column of the ratio table for a load ("1 assoc", "4 assoc", ...)."""
    if load == "1 assoc":
        return f">= {GOAL_ONE_ASSOC:.1f}"
    return f">= {GOAL_PARALLEL:.1f} (aim {AIM_PARALLEL:.1f})"


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def markdown(
    rows: list[Summary], results: list[Measurement], loads: list[str], n: int, runs: int
) -> str:
    lines = [
        f"{n} CT slices 512x512x16 bit, storescu -> 127.0.0.1, median of {runs} run(s)",
        "",
        "| load | receiver | instances/s | MB/s | runs (instances/s) |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        runs_text = ", ".join(f"{v:.0f}" for v in row.runs_per_s)
        lines.append(
            f"| {row.load} | {row.label} | {row.per_s:.0f} | {row.mb_per_s:.0f} | {runs_text} |"
        )
    heading = (
        "| load | pacs-node/storescp | pacs-node/Orthanc | goal (/Orthanc) "
        "| fsync share | catalog share |"
    )
    lines += [
        "",
        heading,
        "|---|---:|---:|---|---:|---:|",
    ]
    for load in loads:
        lines.append(
            f"| {load} "
            f"| {_fmt(ratio(results, load, 'pacs-node', 'storescp'), '{:.2f}')} "
            f"| {_fmt(ratio(results, load, 'pacs-node', 'orthanc'), '{:.2f}')} "
            f"| {goal(load)} "
            f"| {_fmt(share(results, load, 'pacs-node-nofsync'), '{:.0%}')} "
            f"| {_fmt(share(results, load, 'pacs-node-nocatalog'), '{:.0%}')} |"
        )
    lines += [
        "",
        "Ratios and shares: medians of per-run values. Share = 1 - t(variant) / t(shipped).",
    ]
    return "\n".join(lines)


def machine_info(base: Path) -> dict[str, Any]:
    import pydicom
    import pynetdicom
    import sqlalchemy

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    filesystem = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        filesystem = subprocess.run(
            ["df", "-T", str(base)], capture_output=True, text=True, check=False
        ).stdout.splitlines()[-1]
    try:
        from pacs_node import __version__ as pacs_node_version
    except ImportError:
        pacs_node_version = "unknown"
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "filesystem": filesystem,
        "python": sys.version.split()[0],
        "versions": {
            "pacs-node": pacs_node_version,
            "pydicom": pydicom.__version__,
            "pynetdicom": pynetdicom.__version__,
            "sqlalchemy": sqlalchemy.__version__,
            "sqlite": sqlite3.sqlite_version,
            "dcmtk": tool_version([STORESCU, "--version"]),
            "orthanc": tool_version([ORTHANC, "--version"]),
        },
    }


# --------------------------------------------------------------------------------------------
# Entry points


def serve_no_catalog(argv: list[str]) -> None:
    """``pacs-node serve`` with ``CatalogRecorder.submit`` a no-op (the catalog-share variant)."""
    from pacs_node.cli.app import app
    from pacs_node.ingest.recorder import CatalogRecorder
    from pacs_node.refs import InstanceRef

    def submit(self: CatalogRecorder, ref: InstanceRef) -> None:
        del self, ref

    CatalogRecorder.submit = submit  # type: ignore[method-assign]
    sys.argv = ["pacs-node", *argv]
    app()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=300, help="CT slices to send (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="runs per target and load")
    parser.add_argument("--assocs", type=int, default=4, help="associations in the parallel load")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="base folder for data (default: system temp)"
    )
    parser.add_argument(
        "--targets",
        default=",".join(t.key for t in TARGETS),
        help="comma-separated subset of: " + ", ".join(t.key for t in TARGETS),
    )
    args = parser.parse_args(argv)
    if args.n < args.assocs or args.assocs < 1 or args.runs < 1:
        parser.error("need --n >= --assocs >= 1 and --runs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (STORESCU, STORESCP, ECHOSCU, ORTHANC):
        if not Path(tool).exists():
            print(f"missing {tool}", file=sys.stderr)
            return 2
    wanted = set(args.targets.split(","))
    targets = [t for t in TARGETS if t.key in wanted]
    loads = [1, args.assocs] if args.assocs > 1 else [1]
    results: list[Measurement] = []
    with work_dir(args.work_dir, "pacs-node-bench-") as base:
        print(f"generating {args.n} CT slices in {base}", file=sys.stderr)
        files = generate_series(base / "series", args.n)
        size = sum(path.stat().st_size for path in files)
        info = machine_info(base)
        for run in range(args.runs):
            for target in targets:
                for assocs in loads:
                    m = measure(target, files, size, assocs, run, base)
                    results.append(m)
                    print(
                        f"run {run + 1}/{args.runs} {target.key:20s} {m.load}: "
                        f"{m.per_s:7.1f} instances/s {m.mb_per_s:6.1f} MB/s "
                        f"(acked {m.send_seconds:.2f} s, stored {m.seconds:.2f} s)",
                        file=sys.stderr,
                    )
    load_names = [f"{a} assoc" for a in loads]
    rows = summarise(results, load_names)
    table = markdown(rows, results, load_names, args.n, args.runs)
    print(table)
    report = {
        "benchmark": "ingest",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/ingest.py", *(argv or sys.argv[1:])]),
        "machine": info,
        "n": args.n,
        "runs": args.runs,
        "assocs": args.assocs,
        "bytes_per_run": size,
        "summary": [asdict(row) for row in rows],
        "ratios": {
            load: {
                "pacs_node_over_storescp": ratio(results, load, "pacs-node", "storescp"),
                "pacs_node_over_orthanc": ratio(results, load, "pacs-node", "orthanc"),
                "goal_over_orthanc": goal(load),
                "fsync_share": share(results, load, "pacs-node-nofsync"),
                "catalog_share": share(results, load, "pacs-node-nocatalog"),
            }
            for load in load_names
        },
        "measurements": [{**asdict(m), "per_s": m.per_s, "mb_per_s": m.mb_per_s} for m in results],
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-no-catalog":
        serve_no_catalog(sys.argv[2:])
    else:
        sys.exit(main())
