"""What ``/metrics`` exposes, read from the catalog at the moment it is asked: counts only, never
patient data.

The node's work happens in several processes (Storage SCP workers, job workers, the outbox),
so numbers kept in one process's memory would show that process's share only. Everything here
comes from the catalog they all write: the ``counters`` table (incremented in the transactions
that did the work), row counts by state, and the stage seconds of recently finished jobs.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    QuarantineItem,
    QuarantineState,
    Study,
    StudyState,
)
from pacs_node.catalog.studies import counters
from pacs_node.config import Settings
from pacs_node.destinations import DimseDestination
from pacs_node.services.group import GroupView, group_view
from pacs_node.services.status import recorder_state
from pacs_node.tls import (
    ReloadingContext,
    Served,
    TLSFileError,
    TLSFiles,
    client_source,
    reloading_server_context,
)

RECENT_JOBS = 500  # finished jobs whose stage seconds make up the stage quantiles
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True, slots=True)
class StageSeconds:
    """Seconds one stage took over the recent finished jobs that ran it."""

    jobs: int
    total: float
    quantiles: dict[float, float]


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    counters: dict[str, int]
    studies: dict[str, int]  # by state
    instances: int  # held in the catalog now (retention removes old ones)
    instance_bytes: int
    jobs: dict[str, int]  # by state
    deliveries: dict[str, int]  # by state
    quarantine_held: int
    stages: dict[str, StageSeconds]
    recorder_catalog_available: bool
    recorder_unrecorded: int
    group: GroupView | None = None  # the job queue, the timer lease, the registered nodes
    queue_depth: int = field(init=False)  # jobs waiting for a worker

    def __post_init__(self) -> None:
        object.__setattr__(self, "queue_depth", self.jobs.get(JobState.QUEUED.value, 0))


def _by_state(
    found: list[tuple[object, int]], states: type[StudyState | JobState | DeliveryState]
) -> dict[str, int]:
    counted = {state.value: 0 for state in states}
    for state, n in found:
        counted[str(getattr(state, "value", state))] = int(n)
    return counted


def _quantile(ordered: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted values."""
    rank = min(max(1, math.ceil(q * len(ordered))), len(ordered))
    return ordered[rank - 1]


def _stages(timings: list[dict[str, float]]) -> dict[str, StageSeconds]:
    per_stage: dict[str, list[float]] = {}
    for job in timings:
        for stage, seconds in (job or {}).items():
            if isinstance(seconds, int | float):
                per_stage.setdefault(stage, []).append(float(seconds))
    stages = {}
    for stage, values in sorted(per_stage.items()):
        ordered = sorted(values)
        stages[stage] = StageSeconds(
            jobs=len(ordered),
            total=math.fsum(ordered),
            quantiles={q: _quantile(ordered, q) for q in QUANTILES},
        )
    return stages


def node_metrics(
    catalog: Catalog, settings: Settings, recent_jobs: int = RECENT_JOBS
) -> NodeMetrics:
    """One reading of every metric; raises when the catalog cannot be read."""
    recorder = recorder_state(settings)
    unrecorded = recorder.get("unrecorded")
    with catalog.sessions() as session:
        studies = session.execute(select(Study.state, func.count(Study.id)).group_by(Study.state))
        jobs = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state))
        deliveries = session.execute(
            select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)
        )
        instances, stored = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        held = session.scalar(
            select(func.count(QuarantineItem.id)).where(
                QuarantineItem.state == QuarantineState.HELD
            )
        )
        timings = list(
            session.scalars(
                select(Job.timings)
                .where(
                    Job.state.in_([JobState.DONE, JobState.FAILED]), Job.finished_at.is_not(None)
                )
                .order_by(Job.finished_at.desc(), Job.id.desc())
                .limit(recent_jobs)
            )
        )
        return NodeMetrics(
            counters=counters(session),
            studies=_by_state([(r[0], r[1]) for r in studies], StudyState),
            instances=int(instances),
            instance_bytes=int(stored),
            jobs=_by_state([(r[0], r[1]) for r in jobs], JobState),
            deliveries=_by_state([(r[0], r[1]) for r in deliveries], DeliveryState),
            quarantine_held=int(held or 0),
            stages=_stages(timings),
            recorder_catalog_available=bool(recorder.get("catalog_available", True)),
            recorder_unrecorded=unrecorded if isinstance(unrecorded, int) else 0,
            group=group_view(session, settings),
        )


def _served(settings: Settings) -> dict[str, Served]:
    """What each configured TLS context serves in this process (the same files and rules as
    the SCP's and the senders'): ``dicom`` for the DICOM TLS port, ``destination:NAME`` for a
    DIMSE destination over TLS. One whose files do not load here is left out."""
    options = settings.node
    sources: dict[str, Callable[[], ReloadingContext]] = {}
    if options.dicom_tls_port:
        files = TLSFiles(
            options.tls_cert_file, options.tls_key_file, options.tls_ca_file, options.tls_crl_file
        )
        sources["dicom"] = functools.partial(
            reloading_server_context, files, options.tls_require_client_cert
        )
    for name, destination in sorted(settings.destinations.items()):
        if isinstance(destination, DimseDestination) and destination.tls:
            sources[f"destination:{name}"] = functools.partial(
                client_source, destination.tls_files()
            )
    served = {}
    for label, source in sources.items():
        try:
            served[label] = source().served()
        except (TLSFileError, ssl.SSLError, OSError):
            continue
    return served


def certificate_expiry(settings: Settings) -> dict[str, float]:
    """When each TLS certificate in use expires (Unix seconds; a CA bundle: its earliest), as
    loaded, not as on disk: a renewed file that was refused does not show. ``dicom`` and
    ``dicom_ca`` for the DICOM TLS port, ``destination:NAME`` and ``destination_ca:NAME`` for
    DIMSE destinations over TLS."""
    expiry = {}
    for label, served in _served(settings).items():
        ca_label = label.replace(":", "_ca:") if ":" in label else f"{label}_ca"
        for key, when in ((label, served.cert_not_after), (ca_label, served.ca_not_after)):
            if when is not None:
                expiry[key] = when.timestamp()
    return expiry


def certificate_reload_refused(settings: Settings) -> dict[str, int]:
    """1 for each TLS context whose files changed on disk into ones that do not load (the
    previous certificate still serves), else 0; labels as :func:`certificate_expiry`'s."""
    return {label: int(served.refused) for label, served in _served(settings).items()}
