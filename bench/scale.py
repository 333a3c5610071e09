"""Scale-out benchmark: studies per hour with the local job pool and with 1, 2 and 3 Celery
workers, on the same studies and model, as ratios measured in one run.

What it does
------------
1. Renders one procedural phantom CT (``bench/e2e.py``'s template: 512 x 512 at 2.5 mm,
   ``--slices`` slices, default 40) once, outside the clock; every study is that image under
   fresh UIDs and its own patient.
2. For each run (``--runs``, default 3) and each setup, interleaved so that a ratio compares
   measurements taken minutes apart, not hours:

   - ``local``: ``pacs-node serve`` with a local pool of one worker (``job_workers: 1``);
   - ``celery-N`` (N = 1, 2, 3): the same node with ``job_queue: celery`` on a redis-server of
     the bench's own and N ``pacs-node worker --concurrency 1`` processes;

   each on a fresh PostgreSQL database (``--postgres``, the admin URL the tests use) and a fresh
   data folder, routing every CT to ``--model`` (``ct-classical``), results built and stored,
   nothing sent (deliveries are the ingest node's work, measured by ``bench/e2e.py``). Before
   the clock, as many small warm-up studies as there are workers are processed, so each worker
   has imported its code and loaded the model.
3. Clock: the first ``storescu`` starts (``--studies`` studies, default 20, sent one after the
   other on one association each) -> every study's job is done in the catalog. Reports
   studies/hour per setup and run, the median and the spread (min-max) over runs, and each
   setup's ratio to ``local`` as the median of the per-run ratios.
4. A projection on paper for GPU workers: with ``--gpu-seconds-per-study G`` (the model's GPU
   time per study measured on a host with a GPU, e.g. with ``bench/inference.py``), N GPU
   workers give about N x 3600 / (G + C) studies/hour, where C is the CPU part of a job
   (decode, build, store: the median of this run's job timings in the setups that run one job
   at a time), until the ingest nodes or the catalog are the bound.

This machine has 2 cores shared by the node, the workers, storescu and PostgreSQL: a job is
CPU-bound, so more workers than free cores add nothing but contention. On a host with C cores
expect studies/hour to grow about linearly with workers up to roughly C - 1 (one core for the
ingest node and the catalog), then flatten. Numbers are noisy; compare ratios from one run.

Usage: ``python bench/scale.py [--studies 20] [--runs 3] [--workers 1,2,3] [--slices 40]
[--gpu-seconds-per-study G]`` (output ``bench/results/scale.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import dicom_env, free_port, stop_process, wait_until, work_dir  # noqa: E402
from e2e import (  # noqa: E402
    NODE_AE,
    STORESCU,
    load,
    machine_info,
    render_template,
    storescu,
    tail,
    write_study,
)

POSTGRES_ADMIN_URL = os.environ.get(
    "PACS_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SCANNER = "CT_SCANNER_1"
START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 3600.0
CPU_STAGES = ("decode_s", "build_s", "store_s")


def executable() -> str:
    return str(Path(sys.executable).parent / "pacs-node")


@contextlib.contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"pacs_node_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server of the bench's own on a free loopback port, without persistence."""
    import redis

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*argv, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.5)

    def pong() -> bool:
        with contextlib.suppress(redis.ConnectionError):
            return bool(client.ping())
        return False

    try:
        wait_until(pong, START_TIMEOUT_S, "redis-server", 0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        stop_process(proc)


@dataclass
class Setup:
    name: str
    workers: int  # Celery workers; 0: the node's local pool


class Deployment:
    """One node (and its Celery workers) on a fresh catalog and data folder."""

    def __init__(
        self, folder: Path, setup: Setup, db_url: str, broker: str, model: str, quiet: float
    ) -> None:
        self.folder, self.setup = folder, setup
        self.config_dir = folder / "ae_config"
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        node: dict[str, Any] = {
            "ae_title": NODE_AE,
            "dicom_host": "127.0.0.1",
            "dicom_port": self.port,
            "web_host": "127.0.0.1",
            "web_port": free_port(),
            "data_dir": str(folder / "var"),
            "models_dir": str(ROOT / "models"),
            "database_url": db_url,
            "quiet_period_s": quiet,
            "min_free_mb": 0,
            "job_workers": 1,  # one local worker against N Celery workers of one job each
        }
        if setup.workers:
            node.update(job_queue="celery", broker_url=broker, job_queue_prefix=f"{setup.name}.")
        routes = {
            "rules": [
                {
                    "name": "ct-bench",
                    "when": {"modality": "CT"},
                    "select": "thinnest",
                    "models": [model],
                    "qa": "flag",  # stored whatever the gate says: this measures the work
                }
            ]
        }
        peers = {"peers": [{"ae_title": SCANNER, "host": "127.0.0.1"}]}
        self.config_dir.mkdir(parents=True, exist_ok=True)
        for name, content in (("node", node), ("peers", peers), ("routes", routes)):
            (self.config_dir / f"{name}.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
        from pacs_node.catalog.db import open_catalog

        self.catalog = open_catalog(db_url)  # migrated here, before the node starts

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [executable(), *args, "--config", str(self.config_dir)],
                env=dicom_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start(self) -> Deployment:
        node = self._spawn("node", "serve")
        for number in range(self.setup.workers):
            self._spawn(f"worker{number}", "worker", "--concurrency", "1")

        def listening() -> bool:
            if node.poll() is not None:
                raise RuntimeError(f"node exited at start:\n{tail(self.folder / 'node.log')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(listening, START_TIMEOUT_S, "the node's DICOM port", 0.1)
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.catalog.dispose()

    def jobs_done(self, expected: int) -> list[dict[str, float]] | None:
        """Every job's timings once ``expected`` jobs are done; None before. Raises on a
        failed job."""
        from sqlalchemy import select

        from pacs_node.catalog.models import Job

        with self.catalog.sessions() as session:
            jobs = session.scalars(select(Job)).all()
            for job in jobs:
                if job.state.value in ("failed", "cancelled"):
                    logs = "".join(tail(p) for p in sorted(self.folder.glob("*.log")))
                    raise RuntimeError(f"job {job.id} {job.state.value}: {job.error}\n{logs}")
            done = [dict(job.timings or {}) for job in jobs if job.state.value == "done"]
        return done if len(done) >= expected else None


@dataclass
class Measured:
    setup: str
    run: int
    studies: int
    seconds: float
    studies_per_hour: float
    cpu_s_per_study: float  # median of decode + build + store over the timed jobs
    load: dict[str, list[float]] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args, self.base = args, base
        self.index = 0
        print(f"rendering a {args.slices}-slice 512x512 phantom CT ...", file=sys.stderr)
        self.template = render_template(args.slices)
        self.small = self.template[:24]

    def study_files(self, small: bool = False) -> list[Path]:
        self.index += 1
        folder = self.base / "studies" / f"study{self.index:03d}"
        return write_study(self.small if small else self.template, folder, self.index).files

    def measure(self, setup: Setup, run: int, broker: str) -> Measured:
        folder = self.base / f"run{run}-{setup.name}"
        studies = [self.study_files() for _ in range(self.args.studies)]
        warm = [self.study_files(small=True) for _ in range(max(1, setup.workers))]
        with database(self.args.postgres) as db_url:
            deployment = Deployment(
                folder, setup, db_url, broker, self.args.model, self.args.quiet_period_s
            )
            try:
                deployment.start()
                for files in warm:  # each worker loads its code and the model, off the clock
                    storescu(deployment.port, SCANNER, files, folder / "storescu.log")
                wait_until(
                    lambda: deployment.jobs_done(len(warm)) is not None,
                    JOB_TIMEOUT_S,
                    "the warm-up jobs",
                    0.2,
                )
                before = load()
                start = time.monotonic()
                for files in studies:
                    storescu(deployment.port, SCANNER, files, folder / "storescu.log")
                total = len(warm) + len(studies)
                timings: list[dict[str, float]] = []

                def finished() -> bool:
                    found = deployment.jobs_done(total)
                    if found is not None:
                        timings.extend(found)
                    return found is not None

                wait_until(finished, JOB_TIMEOUT_S, f"{total} jobs done", 0.2)
                seconds = time.monotonic() - start
            except BaseException:
                logs = "".join(tail(p) for p in sorted(folder.glob("*.log")))
                print(f"logs of {setup.name}:\n{logs}", file=sys.stderr)
                raise
            finally:
                deployment.stop()
        cpu = statistics.median(sum(t.get(k, 0.0) for k in CPU_STAGES) for t in timings)
        measured = Measured(
            setup.name,
            run,
            len(studies),
            round(seconds, 2),
            round(len(studies) / seconds * 3600, 1),
            round(cpu, 2),
            {"before": before, "after": load()},
        )
        print(
            f"run {run + 1}/{self.args.runs} {setup.name}: {len(studies)} studies in "
            f"{seconds:.1f} s = {measured.studies_per_hour:.0f} studies/h (load {measured.load})",
            file=sys.stderr,
        )
        return measured


def summarise(setups: Sequence[Setup], runs: list[Measured]) -> dict[str, dict[str, Any]]:
    """Per setup: median and spread of studies/hour, and the median per-run ratio to local."""
    local = {m.run: m.studies_per_hour for m in runs if m.setup == "local"}
    summary: dict[str, dict[str, Any]] = {}
    for setup in setups:
        own = [m for m in runs if m.setup == setup.name]
        rates = [m.studies_per_hour for m in own]
        ratios = [m.studies_per_hour / local[m.run] for m in own if local.get(m.run)]
        summary[setup.name] = {
            "workers": setup.workers,  # 0: the node's local pool (1 job worker)
            "studies_per_hour": round(statistics.median(rates), 1),
            "min": min(rates),
            "max": max(rates),
            "ratio_to_local": round(statistics.median(ratios), 2) if ratios else None,
            "cpu_s_per_study": round(statistics.median(m.cpu_s_per_study for m in own), 2),
        }
    return summary


def projection(gpu_s: float | None, cpu_s: float, counts: Sequence[int]) -> dict[str, float]:
    """Studies/hour of N GPU workers on paper: each study takes its GPU time plus the CPU part
    of the job, and the workers run side by side (ingest and catalog not the bound)."""
    if gpu_s is None:
        return {}
    return {str(n): round(n * 3600 / (gpu_s + cpu_s), 1) for n in counts}


def markdown(
    summary: dict[str, dict[str, Any]], args: argparse.Namespace, gpu: dict[str, float]
) -> str:
    lines = [
        (
            f"{args.studies} studies of {args.slices} x 512 x 512 CT (phantom), model "
            f"{args.model}, PostgreSQL catalog, median of {args.runs} run(s) (min-max); "
            f"{os.cpu_count()} CPU cores, CPU-bound"
        ),
        "",
        "| jobs run by | studies/hour | spread | ratio to local pool | CPU s per study |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in summary.values():
        ratio = "" if row["ratio_to_local"] is None else f"{row['ratio_to_local']:.2f}"
        count = int(row["workers"])
        label = f"{count} Celery worker{'s' if count > 1 else ''}" if count else "local pool (1)"
        lines.append(
            f"| {label} | {row['studies_per_hour']:.0f} | {row['min']:.0f}-{row['max']:.0f} "
            f"| {ratio} | {row['cpu_s_per_study']:.1f} |"
        )
    if gpu:
        lines += [
            "",
            (
                f"Projection on paper, {args.gpu_seconds_per_study:g} GPU s per study (measured "
                "on a GPU host) + the CPU part above, workers side by side:"
            ),
            "",
            "| GPU workers | studies/hour |",
            "| ---: | ---: |",
            *(f"| {n} | {rate:.0f} |" for n, rate in gpu.items()),
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=20, help="studies per setup and run (20)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every setup (3)")
    parser.add_argument("--workers", default="1,2,3", help="Celery worker counts (1,2,3)")
    parser.add_argument("--slices", type=int, default=40, help="CT slices per study (40)")
    parser.add_argument("--model", default="ct-classical", help="the model every study runs")
    parser.add_argument("--quiet-period-s", type=float, default=1.0, help="node quiet period")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument(
        "--gpu-seconds-per-study",
        type=float,
        default=None,
        help="GPU time per study measured on a GPU host: adds the N-GPU-worker projection",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="base folder (system temp)")
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(n) for n in args.workers.split(",") if n.strip()]
    except ValueError:
        parser.error("--workers: comma-separated integers, e.g. 1,2,3")
    if args.studies < 1 or args.runs < 1 or args.slices < 24:
        parser.error("need --studies >= 1, --runs >= 1, --slices >= 24")
    if any(n < 1 for n in args.worker_counts):
        parser.error("--workers: each count at least 1")
    if args.gpu_seconds_per_study is not None and args.gpu_seconds_per_study <= 0:
        parser.error("--gpu-seconds-per-study must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(STORESCU).exists():
        print(f"missing {STORESCU}", file=sys.stderr)
        return 2
    setups = [Setup("local", 0), *(Setup(f"celery-{n}", n) for n in args.worker_counts)]
    info = machine_info()
    runs: list[Measured] = []
    with work_dir(args.work_dir, "pacs-node-scale-") as base:
        bench = Bench(args, base)
        with redis_server(base / "redis") as broker:
            for run in range(args.runs):
                for setup in setups:
                    runs.append(bench.measure(setup, run, broker))
    summary = summarise(setups, runs)
    # the CPU part of a job without contention: the setups running one job at a time
    cpu_s = statistics.median(m.cpu_s_per_study for m in runs if m.setup in ("local", "celery-1"))
    gpu = projection(args.gpu_seconds_per_study, cpu_s, (1, 2, 4, 8))
    table = markdown(summary, args, gpu)
    print(table)
    report = {
        "benchmark": "scale",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/scale.py", *(argv or sys.argv[1:])]),
        "machine": {**info, "load_average_at_end": load()},
        "settings": {
            "studies": args.studies,
            "runs": args.runs,
            "slices": args.slices,
            "model": args.model,
            "quiet_period_s": args.quiet_period_s,
            "setups": [asdict(s) for s in setups],
            "clock": "first storescu starts -> every job done (results stored, nothing sent)",
        },
        "summary": summary,
        "runs": [asdict(m) for m in runs],
        "gpu_projection": {
            "gpu_seconds_per_study": args.gpu_seconds_per_study,
            "cpu_seconds_per_study": round(cpu_s, 2),
            "studies_per_hour_by_workers": gpu,
        },
        "scaling": (
            "CPU-bound: each job takes one core while it runs; on C cores studies/hour grows "
            "about linearly with workers up to roughly C - 1, then flattens"
        ),
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
