"""Runs jobs: the one place that ties the stages together.

A claimed job goes: the spooled files of its series -> :func:`load_series` -> the model
(:class:`Runner`) -> :func:`build_results`, once, with the quality gate of the job's route
(:mod:`pacs_node.quality`) -> the bytes stored (atomic files) and their ``results`` rows -> one
``deliveries`` row per (result, destination), held for an operator when the result failed the
gate under ``qa: hold`` (:mod:`pacs_node.catalog.quality`) -> ``done``. Each stage is
recorded on the job (stage, progress, seconds); a failure records the stage and the reason.

Where it runs. Inference takes both cores for seconds and building results holds the GIL in
pure Python (highdicom, matplotlib), so jobs run in worker *processes* (``job_workers``, 1 by
default on 2 cores), started with ``spawn``: the main process, which records received
instances and runs assembly and the outbox, never imports torch and stays responsive while a
model runs. Workers share nothing but the catalog; claims are compare-and-set (see
:mod:`pacs_node.catalog.jobs`), so any number of them, in any number of nodes, never take the
same job. :func:`run_burst` runs the same loop in the calling process until the queue is empty
(tests, ``pacs-node run --wait``); a Celery task would call :func:`run_job` the same way.

A job whose worker died (SIGKILL, OOM) is ``running`` in the catalog with that worker's id;
:meth:`WorkerPool.start` puts such jobs of this host back in the queue, and fails the ones that
already took ``job_max_attempts`` workers down. A stopping node asks each worker, over a pipe of
its own, to stop after its current job (SIGTERM does the same); one still busy at the node's
deadline is killed and its job re-queued (a stop never fails a job).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.catalog.deliveries import create_deliveries
from pacs_node.catalog.jobs import claim_job, fail_job, finish_job, requeue_orphans, set_progress
from pacs_node.catalog.models import Instance, Job, JobState, Series, Study
from pacs_node.catalog.quality import hold_for_quality, record_verdict
from pacs_node.catalog.results import (
    FHIR_MEDIA_TYPE,
    StoredEncoding,
    add_result_rows,
    attempt_folder,
    write_files,
)
from pacs_node.config import Settings
from pacs_node.dispatch.destinations import SOURCE, FhirDestination, source_name
from pacs_node.errors import PacsNodeError
from pacs_node.lifecycle import SignalPipe, exit_now, join_or_kill
from pacs_node.redact import scrub_reason

if TYPE_CHECKING:
    from pacs_node.inference.runner import Runner
    from pacs_node.quality import QaMode, QualityLimits
    from pacs_node.results import ResultOptions, ResultSet

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often an idle worker looks for a queued job
STOP = "stop"  # the node's message to a worker: stop after the current job
SUPERVISE_S = 1.0  # how often the pool looks for a dead worker to replace


class Cancelled(Exception):
    """The job was cancelled while it ran; its work is discarded."""


def host_prefix() -> str:
    return f"{socket.gethostname()}:"


def worker_id(label: str) -> str:
    return f"{host_prefix()}{os.getpid()}:{label}"


def results_dir(settings: Settings) -> Path:
    return settings.node.data_dir / "results"


@dataclass
class JobInput:
    """What a job needs from the catalog, read once at its start."""

    job_id: int
    model: str
    rule: str | None
    study_uid: str
    calling_ae: str | None
    destinations: dict[str, list[str]]
    series: dict[str, list[Path]]
    attempt: int
    waited_s: float  # from queued to claimed


@dataclass
class Stopwatch:
    """Seconds per stage, in the order stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, value: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + value, 4)

    def as_json(self) -> dict[str, float]:
        total = sum(v for k, v in self.seconds.items() if k != "queued_s")
        return {**self.seconds, "total_s": round(total, 4)}


def _kind_key(kind: str) -> str:
    """routes.yaml spells output kinds with ``_`` (key_images), OutputKind with ``-``."""
    return kind.replace("_", "-")


def read_job(catalog: Catalog, settings: Settings, job_id: int) -> JobInput:
    with catalog.sessions() as session:
        job, study = session.execute(
            select(Job, Study).join(Study, Study.id == Job.study_id).where(Job.id == job_id)
        ).one()
        wanted = job.series_uids
        rows = session.execute(
            select(Series.series_uid, Instance.path)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.series_uid.in_(wanted), Series.study_id == study.id)
            .order_by(Instance.id)
        ).all()
        raw = job.destinations
        destinations = {
            _kind_key(kind): [source_name(study.calling_ae) if n == SOURCE else n for n in names]
            for kind, names in raw.items()
        }
        series: dict[str, list[Path]] = {uid: [] for uid in wanted}
        for uid, path in rows:
            series[uid].append(settings.node.spool_dir / path)
        return JobInput(
            job_id=job.id,
            model=job.model,
            rule=job.rule,
            study_uid=study.study_uid,
            calling_ae=study.calling_ae,
            destinations=destinations,
            series=series,
            attempt=job.attempts,
            waited_s=((job.started_at or job.created_at) - job.created_at).total_seconds(),
        )


def result_options(settings: Settings, destinations: dict[str, list[str]]) -> ResultOptions:
    """Results options for this job: the FHIR identity rules of each of its FHIR destinations
    (one Bundle each; the first one's are also the default Bundle's)."""
    from pacs_node.results import FhirOptions, ResultOptions

    base = FhirOptions()
    rules: dict[str, FhirOptions] = {}
    for name in destinations.get("fhir", []):
        dest = settings.destinations.get(name)
        if isinstance(dest, FhirDestination):
            rules[name] = FhirOptions(
                patient_system=dest.patient_system or base.patient_system,
                issuer_systems=dict(dest.issuer_systems),
                accession_system=dest.accession_system or base.accession_system,
                create_patient=dest.create_patient,
            )
    return ResultOptions(
        fhir=next(iter(rules.values()), base),
        fhir_destinations=rules,
        jpeg2000_copy=settings.node.seg_jpeg2000_copy,
    )


def quality_policy(settings: Settings, job: JobInput) -> tuple[QaMode, dict[str, Any] | None]:
    """The gate for this job: its route's ``qa`` mode (hold for a job started by hand or by a
    rule no longer configured) and the route's overrides of the model's limits."""
    from pacs_node.quality import QaMode

    rule = next((r for r in settings.routes.rules if r.name == job.rule), None)
    if rule is None:
        return QaMode.HOLD, None
    return rule.qa, rule.qa_limits


def stored_encodings(results: ResultSet, fhir_names: Sequence[str] = ()) -> list[StoredEncoding]:
    """Every object of a result set as encodings to store; an alternate (the JPEG 2000 SEG)
    becomes a second encoding of the primary object of its kind. Each FHIR destination gets
    the Bundle built under its own rules; the default Bundle is kept for ``fhir_names`` that
    have none (not configured yet) or when there is no per-destination one."""
    from pacs_node.results import OutputKind

    items = [
        StoredEncoding(
            kind=str(o.kind),
            sop_class_uid=o.sop_class_uid,
            sop_instance_uid=o.sop_instance_uid,
            series_uid=o.series_instance_uid,
            encoding=o.transfer_syntax_uid,
            data=o.data,
        )
        for o in results.dicom
    ]
    for o in results.alternates:  # a second encoding of the same object, for dispatch to pick
        kind = OutputKind.SEG if o.kind is OutputKind.SEG_JPEG2000 else o.kind
        items.append(
            StoredEncoding(
                kind=str(kind),
                sop_class_uid=o.sop_class_uid,
                sop_instance_uid=o.sop_instance_uid,
                series_uid=o.series_instance_uid,
                encoding=o.transfer_syntax_uid,
                data=o.data,
                primary=False,
            )
        )
    for name, (bundle, search) in results.fhir_by_destination.items():
        items.append(
            StoredEncoding(
                kind=str(OutputKind.FHIR),
                sop_class_uid=None,
                sop_instance_uid=None,
                series_uid=None,
                encoding=FHIR_MEDIA_TYPE,
                data=bundle,
                patient_search=search,
                destination=name,
            )
        )
    own = results.fhir_by_destination
    if results.fhir_bundle and (not own or any(name not in own for name in fhir_names)):
        items.append(
            StoredEncoding(
                kind=str(OutputKind.FHIR),
                sop_class_uid=None,
                sop_instance_uid=None,
                series_uid=None,
                encoding=FHIR_MEDIA_TYPE,
                data=results.fhir_bundle,
                patient_search=results.patient_search,
            )
        )
    return items


def run_job(
    catalog: Catalog, settings: Settings, runner: Runner, job_id: int, worker: str
) -> JobState:
    """Run one claimed job to done or failed (or discard it if cancelled meanwhile)."""
    from pacs_node.imaging.volume import load_series
    from pacs_node.results import build_results

    watch = Stopwatch()

    def stage(name: str, progress: float) -> None:
        with catalog.sessions.begin() as session:
            if not set_progress(session, job_id, worker, name, progress):
                raise Cancelled(name)

    extra = {"job_id": job_id}
    folder = ""
    try:
        job = read_job(catalog, settings, job_id)
        watch.add("queued_s", max(0.0, job.waited_s))
        folder = attempt_folder(job_id, job.attempt)
        extra["study_uid"] = job.study_uid  # type: ignore[assignment]
        log.info("job started", extra={**extra, "model": job.model})
        mode, overrides = quality_policy(settings, job)
        options = result_options(settings, job.destinations)
        limits: QualityLimits | None = None
        failures: list[dict[str, Any]] = []
        items: list[StoredEncoding] = []
        share = 0.9 / max(1, len(job.series))
        for index, (series_uid, paths) in enumerate(job.series.items()):
            base = index * share
            stage("decode", base)
            if not paths:
                raise PacsNodeError(f"series {series_uid} has no stored instances")
            started = time.perf_counter()
            volume = load_series(paths)
            watch.add("decode_s", time.perf_counter() - started)
            stage("infer", base + 0.1 * share)
            segmentation = runner.segment(job.model, volume)
            if segmentation.removals:  # the model's anatomical limits took labels away
                log.info(
                    "anatomical limits applied", extra={**extra, "removed": segmentation.notes}
                )
            for name, seconds in segmentation.timings.as_json().items():
                if name not in ("decode_s", "total_s"):
                    watch.add(name, seconds)
            stage("build", base + 0.6 * share)
            if mode != "off" and limits is None:  # the model's limits, the route's overrides
                from pacs_node.quality import merge_limits

                limits = merge_limits(runner.registry.get(job.model).quality, overrides)
                # held ones too: released later, they reach the PACS with the failed checks named
                options = replace(options, quality=limits, quality_flag=mode in ("flag", "hold"))
            started = time.perf_counter()
            built = build_results(volume, segmentation.labelmap, segmentation.model, options)
            watch.add("build_s", time.perf_counter() - started)
            if built.verdict is not None:
                failures.extend(f.as_json() for f in built.verdict.failures)
            items.extend(stored_encodings(built, job.destinations.get("fhir", [])))
        stage("store", 0.9)
        started = time.perf_counter()
        relpaths = write_files(results_dir(settings), folder, items, fsync=settings.node.fsync)
        with catalog.sessions.begin() as session:
            results = add_result_rows(session, job_id, items, relpaths)
            deliveries = create_deliveries(session, job_id, results, job.destinations)
            verdict = None if limits is None else ("fail" if failures else "pass")
            record_verdict(session, job_id, str(mode), verdict, failures)
            if failures and mode == "hold":
                hold_for_quality(session, job_id, failures)
            watch.add("store_s", time.perf_counter() - started)
            if not finish_job(
                session,
                job_id,
                worker,
                watch.as_json(),
                results=len(results),
                deliveries=deliveries,
            ):
                raise Cancelled("store")
        log.info(
            "job done",
            extra={
                **extra,
                "results": len(results),
                "deliveries": deliveries,
                "quality": verdict or "off",
                **watch.as_json(),
            },
        )
        return JobState.DONE
    except Cancelled:
        if folder:
            shutil.rmtree(results_dir(settings) / folder, ignore_errors=True)
        log.info("job cancelled while running; its work is discarded", extra=extra)
        return JobState.CANCELLED
    except PacsNodeError as exc:
        reason = str(exc)
    except Exception as exc:  # any bug in a stage fails this job, never the worker
        log.exception("job failed unexpectedly", extra=extra)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"{type(exc).__name__}: {exc} ({Path(frame.filename).name}:{frame.lineno})"
    with catalog.sessions.begin() as session:
        current = session.scalar(select(Job.stage).where(Job.id == job_id))
        fail_job(session, job_id, worker, f"{current or 'start'}: {reason}", watch.as_json())
    log.warning("job failed", extra={**extra, "error": scrub_reason(reason)})
    return JobState.FAILED


def make_runner(settings: Settings) -> Runner:
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner

    registry = Registry(settings.node.models_dir, settings.node.model_sha256_allowlist)
    return Runner(registry, threads=settings.node.torch_threads)


def run_burst(
    catalog: Catalog,
    settings: Settings,
    *,
    runner: Runner | None = None,
    label: str = "burst",
    on_job: Callable[[int, JobState], None] | None = None,
) -> list[int]:
    """Claim and run queued jobs in this process until none is left; the ids it ran."""
    runner = runner or make_runner(settings)
    me = worker_id(label)
    ran: list[int] = []
    while True:
        with catalog.sessions.begin() as session:
            job_id = claim_job(session, me)
        if job_id is None:
            return ran
        state = run_job(catalog, settings, runner, job_id, me)
        ran.append(job_id)
        if on_job is not None:
            on_job(job_id, state)


def _follow_the_node(control: Connection, signals: SignalPipe, stop: threading.Event) -> None:
    """Set ``stop`` when the node asks (a message on ``control``) or SIGTERM arrives; end the
    process at once when the node is gone (``control`` at its end): a SIGKILLed node must not
    leave a worker running a job that the restarted node hands to a new worker."""

    def follow() -> None:
        while True:
            for ready in wait([control, signals.fileno()]):
                if ready is control:
                    try:
                        control.recv()
                    except (EOFError, OSError):
                        os._exit(1)
                    stop.set()
                elif signals.next(0) is not None:
                    stop.set()

    threading.Thread(target=follow, name="node-link", daemon=True).start()


def _worker_main(settings: Settings, index: int, control: Connection) -> None:
    """A worker process: claim, run, repeat; idle polls every ``POLL_S``. The node's request
    or a SIGTERM stops it after its current job; SIGINT is the node's to act on, not ours."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signals = SignalPipe((signal.SIGTERM,))
    from pacs_node.logs import configure_node_logging

    configure_node_logging(settings.node)
    stop = threading.Event()
    _follow_the_node(control, signals, stop)
    catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
    runner = make_runner(settings)
    me = worker_id(f"w{index}")
    log.info("job worker started", extra={"worker": me})
    try:
        while not stop.is_set():
            try:
                with catalog.sessions.begin() as session:
                    job_id = claim_job(session, me)
                if job_id is None:
                    stop.wait(POLL_S)
                    continue
                run_job(catalog, settings, runner, job_id, me)
            except SQLAlchemyError:  # the catalog is away for a moment: the job stays running
                log.exception("catalog unavailable; the worker tries again", extra={"worker": me})
                stop.wait(POLL_S * 10)
    finally:
        catalog.dispose()
    log.info("job worker stopped", extra={"worker": me})
    exit_now(0)  # its last job is in the catalog


class WorkerPool:
    """``size`` worker processes; started after the catalog is reconciled, stopped first.

    Each worker has a pipe of its own from the node: a message asks it to stop after its job,
    the pipe's end tells it the node is gone. Nothing is shared between the workers, so one
    that dies (killed for memory, a crash in a native library, a SIGTERM to the process group)
    can never leave another process waiting for it. A dead worker is replaced within
    ``SUPERVISE_S``, and the job it held goes back to the queue, or fails once it has taken
    ``job_max_attempts`` workers down with it."""

    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings
        self.size = settings.node.job_workers
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._processes: list[SpawnProcess] = []
        self._links: list[Connection] = []  # the node's end of each worker's pipe
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def recover(self) -> tuple[int, int]:
        """Jobs this host left running when it died: back to the queue (or failed)."""
        with self.catalog.sessions.begin() as session:
            queued, failed = requeue_orphans(
                session, host_prefix(), self.settings.node.job_max_attempts
            )
        if queued or failed:
            log.info("interrupted jobs recovered", extra={"requeued": queued, "failed": failed})
        return queued, failed

    def start(self) -> None:
        self.recover()
        with self._lock:
            for index in range(self.size):
                process, link = self._spawn(index)
                self._processes.append(process)
                self._links.append(link)
        self._supervisor = threading.Thread(
            target=self._supervise, name="job-worker-supervisor", daemon=True
        )
        self._supervisor.start()

    def _spawn(self, index: int) -> tuple[SpawnProcess, Connection]:
        reader, link = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(self.settings, index, reader),
            name=f"pacs-node-job-worker-{index}",
            daemon=True,
        )
        process.start()
        reader.close()  # the worker has its own copy; the node keeps the only writing end
        return process, link

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_S):
            try:
                self.replace_dead()
            except Exception:  # the catalog away, no memory to spawn: try on the next round
                log.exception("could not replace a dead job worker")

    def replace_dead(self) -> int:
        """Re-queue the job of every dead worker, then start a new worker in its place."""
        with self._lock:
            if self._stopping.is_set():
                return 0
            dead = [(i, p) for i, p in enumerate(self._processes) if not p.is_alive()]
            for index, process in dead:
                with self.catalog.sessions.begin() as session:
                    queued, failed = requeue_orphans(
                        session,
                        f"{host_prefix()}{process.pid}:",
                        self.settings.node.job_max_attempts,
                        by="worker replaced",
                    )
                log.error(
                    "job worker died; replacing it",
                    extra={
                        "worker": index,
                        "exitcode": process.exitcode,
                        "requeued": queued,
                        "failed": failed,
                    },
                )
                self._links[index].close()
                self._processes[index], self._links[index] = self._spawn(index)
        return len(dead)

    def request_stop(self) -> None:
        """Ask every worker to stop after its current job; from now on none is replaced."""
        self._stopping.set()
        with self._lock:
            for link in self._links:
                with contextlib.suppress(OSError):  # that worker is gone already
                    link.send(STOP)

    def stop(self, deadline: float) -> tuple[int, int]:
        """Wait for the workers until ``deadline`` (``time.monotonic()``); kill any still busy
        then and re-queue its job (never failed for it). Returns (stopped, killed)."""
        self.request_stop()
        if self._supervisor is not None:
            self._supervisor.join(max(0.0, deadline - time.monotonic()))
            self._supervisor = None
        with self._lock:
            killed = join_or_kill(self._processes, deadline)
            pids = [p.pid for p in killed]
            stopped = len(self._processes) - len(killed)
            for link in self._links:
                link.close()
            self._processes.clear()
            self._links.clear()
        for pid in pids:
            with self.catalog.sessions.begin() as session:
                requeue_orphans(
                    session,
                    f"{host_prefix()}{pid}:",
                    self.settings.node.job_max_attempts,
                    by="node stopping",
                    stopped=True,
                )
        return stopped, len(killed)

    def kill_now(self) -> None:
        """SIGKILL every worker, waiting for nothing (not even the pool's lock): the node is
        stopping at once, and the jobs they held are re-queued when it starts again."""
        for process in list(self._processes):
            if process.exitcode is None:
                process.kill()

    @property
    def alive(self) -> int:
        return sum(1 for p in self._processes if p.is_alive())
