"""Runs jobs: a claimed job from the catalog to stored results and deliveries.

A claimed job goes: the spooled files of each of its series through :func:`run_series` (decode,
the model, the measurements, the quality gate of the job's route (:mod:`pacs_node.quality`),
the SEG and the SR) -> their bytes stored (atomic files), their ``results`` rows and one
``deliveries`` row per (result, destination), held for an operator when the result failed the
gate under ``qa: hold`` (:mod:`pacs_node.catalog.quality`), committed: the outbox sends them
now -> the presentation state, key images, PDF and FHIR Bundles built, stored and their
deliveries made (held the same way) -> ``done``. Each stage is
recorded on the job (stage, progress, seconds); a failure records the stage and the reason.

Where it runs: in the worker processes of :mod:`pacs_node.jobs` (the main process never
imports torch), or, with :func:`run_burst`, in the calling process until the queue is empty
(tests, ``pacs-node run --wait``); any other runner of jobs calls :func:`run_job` the same way.
Claims are compare-and-set (see :mod:`pacs_node.catalog.jobs`), so any number of runners, in
any number of nodes, never take the same job.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import JOB_REJECTED, create_deliveries
from pacs_node.catalog.jobs import add_job_event, claim_job, fail_job, finish_job, set_progress
from pacs_node.catalog.models import Delivery, Instance, Job, JobState, Result, Series, Study
from pacs_node.catalog.quality import hold_for_quality, record_verdict
from pacs_node.catalog.results import (
    FHIR_MEDIA_TYPE,
    StoredEncoding,
    add_result_rows,
    attempt_folder,
    write_files,
)
from pacs_node.config import Settings
from pacs_node.cpus import inference_threads, limit_threads
from pacs_node.destinations import SOURCE, FhirDestination, source_name
from pacs_node.errors import PacsNodeError
from pacs_node.outputs import OutputKind, kind_of_route_key
from pacs_node.pipeline import (
    STAGE_SHARE,
    Gate,
    SeriesRun,
    Stopwatch,
    build_extras_of,
    run_series,
)
from pacs_node.redact import scrub_reason

if TYPE_CHECKING:
    from pacs_node.inference.runner import Runner
    from pacs_node.quality import QaMode, QualityLimits
    from pacs_node.results import ResultOptions, ResultSet

log = logging.getLogger(__name__)

FIRST_SHARE = 0.6  # of the job's progress: decode, infer, SEG and SR of every series
STORE_FIRST = "store-first"  # stage: the SEG and SR stored, their deliveries committed
EXTRAS = "extras"  # stage: presentation state, key images, PDF and FHIR being built
EXTRAS_SHARE = 0.65
# a failed job's error after its first commit: the SEG and SR are stored and may have gone out;
# a retry stores only what is missing
FIRST_SENT_TEXT = "extras failed after SEG and SR were stored"
RESULTS_FIRST_EVENT = "results_first"  # job event: the SEG and SR committed, before the rest


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
    revision: int = 0  # earlier results of this model on these series a person rejected


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
            kind_of_route_key(kind): [
                source_name(study.calling_ae) if n == SOURCE else n for n in names
            ]
            for kind, names in raw.items()
        }
        earlier = session.scalars(
            select(Job.series_uids).where(
                Job.study_id == job.study_id,
                Job.model == job.model,
                Job.id < job.id,
                Job.qa_decision == JOB_REJECTED,
            )
        ).all()
        revision = sum(1 for uids in earlier if set(uids) == set(wanted))
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
            revision=revision,
        )


def result_options(
    settings: Settings, destinations: dict[str, list[str]], revision: int = 0
) -> ResultOptions:
    """Results options for this job: the FHIR identity rules of each of its FHIR destinations
    (one Bundle each; the first one's are also the default Bundle's), and its revision (see
    :attr:`ResultOptions.revision`)."""
    from pacs_node.results import FhirOptions, ResultOptions

    base = FhirOptions()
    rules: dict[str, FhirOptions] = {}
    for name in destinations.get(OutputKind.FHIR, []):
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
        revision=revision,
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


def _not_stored(session: Any, job_id: int, items: list[StoredEncoding]) -> list[StoredEncoding]:
    """``items`` less the objects an earlier run of this job already stored (same kind, SOP
    Instance UID and destination: the UIDs are deterministic, see
    :mod:`pacs_node.results.provenance`), so that a re-run never stores or delivers them twice."""
    have = {
        (kind, uid, destination)
        for kind, uid, destination in session.execute(
            select(Result.kind, Result.sop_instance_uid, Result.destination).where(
                Result.job_id == job_id
            )
        ).all()
    }
    return [i for i in items if (i.kind, i.sop_instance_uid, i.destination) not in have]


def _counts(session: Any, job_id: int) -> tuple[int, int]:
    """The job's results and deliveries in the catalog: a re-run's and the runs' before it."""
    results = session.scalar(select(func.count(Result.id)).where(Result.job_id == job_id))
    deliveries = session.scalar(select(func.count(Delivery.id)).where(Delivery.job_id == job_id))
    return int(results or 0), int(deliveries or 0)


def _remove(root: Path, relpaths: Sequence[str]) -> None:
    for relpath in relpaths:
        (root / relpath).unlink(missing_ok=True)


def run_job(
    catalog: Catalog,
    settings: Settings,
    runner: Runner,
    job_id: int,
    worker: str,
    attempt: int | None = None,
    on_stored: Callable[[int], None] | None = None,
) -> JobState:
    """Run one claimed job to done or failed (or discard it if cancelled meanwhile).
    ``attempt``: the number the claim itself returned, which names this run's result folder
    (read afresh, a later claim's number could make a stale run overwrite its results).

    Results first, extras after: the SEG and SR of every series (with the quality gate's
    verdict and hold) are stored and their deliveries committed first, so the outbox sends them
    while the presentation state, key images, PDF and FHIR Bundles are built; those are stored
    with the job's end. ``on_stored(deliveries)`` is called after each of the two commits (an
    outbox in this process wakes on it; one in another process finds them at its next poll).
    A re-run of a job whose first part was committed stores only what is missing."""
    watch = Stopwatch()

    def stage(name: str, progress: float) -> None:
        with catalog.sessions.begin() as session:
            if not set_progress(session, job_id, worker, name, progress):
                raise Cancelled(name)

    extra = {"job_id": job_id}
    folder = ""
    written: list[str] = []  # files of this run no committed row names yet
    committed = False
    try:
        job = read_job(catalog, settings, job_id)
        watch.add("queued_s", max(0.0, job.waited_s))
        folder = attempt_folder(job_id, job.attempt if attempt is None else attempt)
        extra["study_uid"] = job.study_uid  # type: ignore[assignment]
        log.info("job started", extra={**extra, "model": job.model})
        mode, overrides = quality_policy(settings, job)
        gate = None if mode == "off" else Gate(overrides, flag=mode in ("flag", "hold"))
        options = result_options(settings, job.destinations, job.revision)
        fhir_names = job.destinations.get(OutputKind.FHIR, [])
        limits: QualityLimits | None = None
        failures: list[dict[str, Any]] = []
        items: list[StoredEncoding] = []
        runs: list[SeriesRun] = []
        version: str | None = None
        share = FIRST_SHARE / max(1, len(job.series))
        for index, (series_uid, paths) in enumerate(job.series.items()):

            def on_stage(name: str, base: float = index * share) -> None:
                stage(name, base + STAGE_SHARE[name] * share)

            run = run_series(
                runner,
                job.model,
                series_uid,
                paths,
                options,
                gate=gate,
                on_stage=on_stage,
                timings=watch,
                extras_later=True,
            )
            if run.segmentation.removals:  # the model's anatomical limits took labels away
                log.info(
                    "anatomical limits applied",
                    extra={**extra, "removed": run.segmentation.notes},
                )
            version = run.segmentation.model.algorithm.version
            if run.limits is not None:
                limits = run.limits
            if run.verdict is not None:
                failures.extend(f.as_json() for f in run.verdict.failures)
            if run.results is not None:  # always, with options given
                items.extend(stored_encodings(run.results, fhir_names))
                runs.append(run)
        verdict = None if limits is None else ("fail" if failures else "pass")
        held = bool(failures) and mode == "hold"

        # 1. the SEG and SR: stored, their deliveries committed (held under qa: hold), sent now
        stage(STORE_FIRST, FIRST_SHARE)
        started = time.perf_counter()
        with catalog.sessions() as session:
            items = _not_stored(session, job_id, items)
        written = write_files(results_dir(settings), folder, items, fsync=settings.node.fsync)
        with catalog.sessions.begin() as session:
            if not set_progress(session, job_id, worker, STORE_FIRST, FIRST_SHARE):
                raise Cancelled(STORE_FIRST)
            results = add_result_rows(session, job_id, items, written)
            first = create_deliveries(session, job_id, results, job.destinations)
            record_verdict(session, job_id, str(mode), verdict, failures)
            if held:  # only what this store created; never after a person's release
                hold_for_quality(session, job_id, failures, [r for r, _ in results])
            if results:  # a re-run that found them stored has nothing new to tell
                add_job_event(
                    session,
                    job_id,
                    RESULTS_FIRST_EVENT,
                    kinds=sorted({kind for _, kind in results}),
                    results=len(results),
                    deliveries=first,
                )
        committed, written = True, []
        del items  # the encoded SEG and SR: on disk and named by rows now
        watch.add("store_s", time.perf_counter() - started)
        if on_stored is not None:
            on_stored(first)
        log.info(
            "first results stored",
            extra={**extra, "results": len(results), "deliveries": first},
        )

        # 2. the presentation state, key images, PDF and FHIR Bundles, then the job's end
        extras: list[StoredEncoding] = []
        step = (0.95 - EXTRAS_SHARE) / max(1, len(runs))
        runs.reverse()  # popped from the end: the first series first
        index = 0
        while runs:
            stage(EXTRAS, EXTRAS_SHARE + index * step)
            run = runs.pop()  # the list no longer holds its volume and labelmap
            extras.extend(stored_encodings(build_extras_of(run, watch), fhir_names))
            del run  # freed before the next series' extras are built
            index += 1
        stage("store", 0.95)
        started = time.perf_counter()
        with catalog.sessions() as session:
            extras = _not_stored(session, job_id, extras)
        written = write_files(results_dir(settings), folder, extras, fsync=settings.node.fsync)
        with catalog.sessions.begin() as session:
            more = add_result_rows(session, job_id, extras, written)
            created = create_deliveries(session, job_id, more, job.destinations)
            if held:
                hold_for_quality(session, job_id, failures, [r for r, _ in more])
            watch.add("store_s", time.perf_counter() - started)
            stored, deliveries = _counts(session, job_id)  # every run's, not this one's
            if not finish_job(
                session,
                job_id,
                worker,
                watch.as_json(),
                results=stored,
                deliveries=deliveries,
                model_version=version,
            ):
                raise Cancelled("store")
        written = []
        if on_stored is not None:
            on_stored(created)
        log.info(
            "job done",
            extra={
                **extra,
                "results": stored,
                "deliveries": deliveries,
                "quality": verdict or "off",
                **watch.as_json(),
            },
        )
        return JobState.DONE
    except Cancelled:
        if committed:  # the first results stay: their rows name them and they may be sent
            _remove(results_dir(settings), written)
        elif folder:
            shutil.rmtree(results_dir(settings) / folder, ignore_errors=True)
        log.info("job cancelled while running; its work is discarded", extra=extra)
        return JobState.CANCELLED
    except PacsNodeError as exc:
        reason = str(exc)
    except Exception as exc:  # any bug in a stage fails this job, never the worker
        log.exception("job failed unexpectedly", extra=extra)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"{type(exc).__name__}: {exc} ({Path(frame.filename).name}:{frame.lineno})"
    if written:  # files no committed row names: never left behind
        _remove(results_dir(settings), written)
    if committed:  # the SEG and SR are stored and may be in the PACS: the job says so
        reason = f"{FIRST_SENT_TEXT}: {reason}"
    with catalog.sessions.begin() as session:
        current = session.scalar(select(Job.stage).where(Job.id == job_id))
        fail_job(session, job_id, worker, f"{current or 'start'}: {reason}", watch.as_json())
    log.warning("job failed", extra={**extra, "error": scrub_reason(reason)})
    return JobState.FAILED


def make_runner(settings: Settings, workers: int = 1) -> Runner:
    """The runner of one of ``workers`` job processes on this host, its torch threads its
    share of the cores (``torch_threads: 0``) so that the processes together never ask for
    more threads than there are cores. The thread variables are set before torch and numpy
    are imported: their pools read them once, at load."""
    threads = inference_threads(settings.node.torch_threads, workers)
    limit_threads(threads)
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner

    registry = Registry(settings.node.models_dir, settings.node.model_sha256_allowlist)
    return Runner(registry, threads=threads)


def run_burst(
    catalog: Catalog,
    settings: Settings,
    *,
    runner: Runner | None = None,
    label: str = "burst",
    on_job: Callable[[int, JobState], None] | None = None,
    on_stored: Callable[[int], None] | None = None,
) -> list[int]:
    """Claim and run queued jobs in this process until none is left; the ids it ran.
    ``on_stored``: see :func:`run_job` (an outbox's ``wake``)."""
    runner = runner or make_runner(settings)
    me = worker_id(label)
    ran: list[int] = []
    while True:
        with catalog.sessions.begin() as session:
            job_id = claim_job(session, me)
        if job_id is None:
            return ran
        state = run_job(catalog, settings, runner, job_id, me, on_stored=on_stored)
        ran.append(job_id)
        if on_job is not None:
            on_job(job_id, state)
