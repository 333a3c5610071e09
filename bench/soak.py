"""Soak: several scanners send to one ``pacs-node serve`` for a set time; how long each C-STORE
waits for its acknowledgement, and whether the node's memory stays flat.

What it does
------------
1. Starts ``pacs-node serve`` as shipped (2 SCP worker processes, fsync, SQLite catalog) on
   127.0.0.1 on a free port, with its data folder in a temporary folder, promiscuous.
2. Starts ``--scus`` sender processes (pynetdicom, one process each, like separate scanners).
   Each sends studies of ``--per-assoc`` small CT slices (``--rows`` x ``--rows``, 16 bit, fresh
   UIDs), one association per study, until ``--minutes`` have passed. The ack latency of an
   instance is the time from handing the C-STORE-RQ to pynetdicom to its C-STORE-RSP.
3. Every ``--sample-s`` seconds it reads VmRSS of the node's main process and of its SCP worker
   processes from /proc, and the catalog's instance count (read-only SQLite).
4. After the senders stop it waits until the catalog holds every acknowledged instance, then
   stops the node, prints the latency percentiles (p50/p90/p99/max) and the RSS table, and
   writes everything to ``bench/results/soak-<UTC time>.json`` (or ``--out``).

Usage: ``python bench/soak.py [--minutes 10] [--scus 4] [--per-assoc 50] [--rows 64]``
(``make soak`` runs it for ``SOAK_MIN`` minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from common import dicom_env, free_port, stop_process, wait_until, work_dir

ROOT = Path(__file__).resolve().parent.parent
CALLING_AE = "SOAKSCU"
ECHOSCU = "/usr/bin/echoscu"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _template(rows: int) -> Any:
    """One CT slice with a realistic header; senders change only its UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE
    ds.PatientName = "Soak^Test"
    ds.PatientID = "SOAK-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "SOAK"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.Manufacturer = "pacs-node bench"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(7)
    ds.PixelData = rng.integers(0, 2000, (rows, rows), dtype=np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def sender(port: int, until: float, per_assoc: int, rows: int, out: Any) -> None:
    """One scanner: studies of ``per_assoc`` instances until ``until`` (time.time())."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ds = _template(rows)
    latencies: list[float] = []
    failures: dict[str, int] = {}
    associations = 0
    while time.time() < until:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.FrameOfReferenceUID = generate_uid()
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        if not assoc.is_established:
            failures["association"] = failures.get("association", 0) + 1
            time.sleep(0.5)
            continue
        associations += 1
        for index in range(per_assoc):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = index + 1
            ds.ImagePositionPatient = [0, 0, -index]
            started = time.perf_counter()
            status = assoc.send_c_store(ds)
            elapsed = time.perf_counter() - started
            code = int(status.Status) if status and "Status" in status else None
            if code == 0:
                latencies.append(elapsed)
            else:
                key = "no response" if code is None else f"0x{code:04X}"
                failures[key] = failures.get(key, 0) + 1
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()
    out.put({"latencies": latencies, "failures": failures, "associations": associations})


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def node_rss(pid: int) -> tuple[int, int]:
    """(main, SCP workers together) VmRSS in KiB."""
    children = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    workers = 0
    for child in map(int, children):
        with contextlib.suppress(FileNotFoundError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "pacs-node-scp":
                workers += _rss_kib(child)
    return _rss_kib(pid), workers


def catalogued(data_dir: Path) -> int:
    path = data_dir / "catalog.sqlite"
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.Error:
        return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--scus", type=int, default=4, help="sender processes")
    parser.add_argument("--per-assoc", type=int, default=50, help="instances per association")
    parser.add_argument("--rows", type=int, default=64, help="image rows = columns")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    return parser.parse_args(argv)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    array = np.asarray(values) * 1000
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": float(array.max())}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or ROOT / "bench" / "results" / f"soak-{stamp}.json"
    with work_dir(args.work_dir, "pacs-node-soak-") as base:
        data_dir, config_dir = base / "data", base / "config"
        config_dir.mkdir()
        port = free_port()
        env = dicom_env()
        env["PACS_NODE_WEB_PORT"] = str(free_port())
        log = (base / "node.log").open("wb")
        node = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "pacs-node"),
                *("serve", "--config", str(config_dir), "--data-dir", str(data_dir)),
                *("--dicom-host", "127.0.0.1", "--dicom-port", str(port), "--promiscuous"),
                *("--quiet-period-s", "5"),
            ],
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        try:
            # the clock starts once an association is answered (the SCP workers are up)
            wait_until(lambda: _echo_ok(port), 120, "a C-ECHO answered", 0.5)
            context = mp.get_context("spawn")
            results: Any = context.Queue()
            start = time.time()
            until = start + args.minutes * 60
            senders = [
                context.Process(
                    target=sender, args=(port, until, args.per_assoc, args.rows, results)
                )
                for _ in range(args.scus)
            ]
            for process in senders:
                process.start()
            samples: list[dict[str, float]] = []
            while time.time() < until:
                main_kib, workers_kib = node_rss(node.pid)
                samples.append(
                    {
                        "t_s": round(time.time() - start, 1),
                        "main_mib": main_kib / 1024,
                        "workers_mib": workers_kib / 1024,
                        "catalogued": catalogued(data_dir),
                    }
                )
                print(
                    f"{samples[-1]['t_s']:7.1f} s  main {samples[-1]['main_mib']:6.1f} MiB  "
                    f"workers {samples[-1]['workers_mib']:6.1f} MiB  "
                    f"catalogued {samples[-1]['catalogued']}",
                    file=sys.stderr,
                )
                time.sleep(min(args.sample_s, max(0.0, until - time.time())))
            reports = [results.get(timeout=300) for _ in senders]
            for process in senders:
                process.join(60)
            latencies = [x for report in reports for x in report["latencies"]]
            failures: dict[str, int] = {}
            for report in reports:
                for key, count in report["failures"].items():
                    failures[key] = failures.get(key, 0) + count
            acked = len(latencies)
            wait_until(lambda: catalogued(data_dir) >= acked, 300, "the catalog", 0.5)
            elapsed = time.time() - start
            main_kib, workers_kib = node_rss(node.pid)
            samples.append(
                {
                    "t_s": round(elapsed, 1),
                    "main_mib": main_kib / 1024,
                    "workers_mib": workers_kib / 1024,
                    "catalogued": catalogued(data_dir),
                }
            )
        finally:
            stop_process(node)
    summary = {
        "instances_acknowledged": acked,
        "instances_catalogued": samples[-1]["catalogued"],
        "failures": failures,
        "associations": sum(r["associations"] for r in reports),
        "per_s": acked / (args.minutes * 60),
        **{k: round(float(v), 2) for k, v in percentiles(latencies).items()},
        "rss_main_mib_first_last": [samples[0]["main_mib"], samples[-1]["main_mib"]],
        "rss_workers_mib_first_last": [samples[0]["workers_mib"], samples[-1]["workers_mib"]],
    }
    table = _markdown(summary, samples, args)
    print(table)
    report = {
        "benchmark": "soak",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/soak.py", *(argv or sys.argv[1:])]),
        "machine": {"hostname": platform.node(), "cpus": os.cpu_count()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "rss_samples": samples,
        "table_markdown": table,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_path}", file=sys.stderr)
    lost = acked - int(samples[-1]["catalogued"])
    return 1 if failures or lost > 0 else 0


def _echo_ok(port: int) -> bool:
    echo = subprocess.run(
        [ECHOSCU, "-to", "5", "-aet", CALLING_AE, "-aec", "PACSNODE", "127.0.0.1", str(port)],
        capture_output=True,
        env=dicom_env(),
        check=False,
    )
    return echo.returncode == 0


def _markdown(summary: dict[str, Any], samples: list[dict[str, float]], args: Any) -> str:
    title = (
        f"Soak: {args.scus} senders, {args.minutes:g} min, {args.per_assoc} instances per "
        f"association, {args.rows}x{args.rows} CT slices"
    )
    row = (
        f"| {summary['instances_acknowledged']} | {summary['instances_catalogued']} | "
        f"{summary['failures'] or 'none'} | {summary['per_s']:.1f} | {summary['p50_ms']:.1f} | "
        f"{summary['p90_ms']:.1f} | {summary['p99_ms']:.1f} | {summary['max_ms']:.1f} |"
    )
    lines = [
        title,
        "",
        "| acknowledged | catalogued | failures | inst/s | p50 ms | p90 ms | p99 ms | max ms |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        row,
        "",
        "| t (s) | main RSS (MiB) | SCP workers RSS (MiB) | catalogued |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {s['t_s']:.0f} | {s['main_mib']:.1f} | {s['workers_mib']:.1f} | {s['catalogued']:.0f} |"
        for s in samples
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
