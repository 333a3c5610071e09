"""``/metrics`` in the Prometheus text format: open, counts only, no patient data.

The node's work is done in several processes (Storage SCP workers, job workers, the outbox),
so a process-local metric would count this process's share only. One custom collector reads
every value from the catalog at scrape time (:mod:`pacs_node.services.metrics`) and is
registered on a registry of this app, never on the global default one. Counters come from the
catalog's ``counters`` table, so they survive restarts; job stage seconds are quantiles over
the most recently finished jobs, exposed as gauges (a window, not a running total).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pacs_node.catalog.studies import RECEIVED_BYTES, RECEIVED_INSTANCES
from pacs_node.services.group import GroupView
from pacs_node.services.metrics import (
    NodeMetrics,
    certificate_expiry,
    certificate_reload_refused,
    node_metrics,
)
from pacs_node.web.context import WebContext, web_context

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

PREFIX = "pacs_node"
# Counters of the catalog every node shows, 0 before the first event; others appear once counted.
COUNTERS = {
    RECEIVED_INSTANCES: "Instances received and recorded into studies.",
    RECEIVED_BYTES: "Bytes of the instances received and recorded into studies.",
    "rejected_associations": "Associations the Storage SCP rejected.",
    "failed_instances": "Instances received that could not be stored (a failure status sent).",
    "duplicate_instances": "Second copies of instances the node holds already.",
    "quarantined_instances": "Instances kept apart by the identity check.",
    "tls_handshake_failures": "TLS handshakes on the DICOM TLS port that failed or timed out.",
}
# The families below: a catalog counter of one of these names (or of one counter's name made
# a metric name already) would clash, so it is left out.
FAMILIES = frozenset(
    {
        "catalog_up",
        "studies",
        "instances",
        "instance_bytes",
        "jobs",
        "queue_depth",
        "deliveries",
        "quarantine_held",
        "recorder_catalog_available",
        "recorder_unrecorded",
        "job_stage_seconds",
        "job_stage_recent_jobs",
        "tls_certificate_expiry_timestamp_seconds",
        "tls_certificate_reload_refused",
        "job_queue_info",
        "job_queue_queued",
        "timer_lease_owner",
        "timer_lease_expiry_timestamp_seconds",
        "timer_lease_is_owner",
        "registered_nodes",
    }
)
_NAME = re.compile(r"[^a-zA-Z0-9_]")
_lock = threading.Lock()


class CatalogCollector(Collector):
    """Every metric of the node, read from its catalog when scraped."""

    def __init__(self, context: WebContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        yield _certificates(certificate_expiry(self.context.settings))
        refused = GaugeMetricFamily(
            f"{PREFIX}_tls_certificate_reload_refused",
            "1 when a TLS certificate's files changed into ones that do not load: the one in "
            "use (whose expiry is shown) still serves.",
            labels=["certificate"],
        )
        for label, value in sorted(certificate_reload_refused(self.context.settings).items()):
            refused.add_metric([label], value)
        yield refused
        up = GaugeMetricFamily(f"{PREFIX}_catalog_up", "Whether the catalog could be read.")
        try:
            reading = node_metrics(self.context.catalog, self.context.settings)
        except Exception as exc:  # a scrape reports the outage rather than failing on it
            log.warning("metrics: catalog unreadable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _metrics(reading)


def _certificates(expiry: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        f"{PREFIX}_tls_certificate_expiry_timestamp_seconds",
        "When a TLS certificate in use expires (notAfter, Unix seconds).",
        labels=["certificate"],
    )
    for label, when in sorted(expiry.items()):
        family.add_metric([label], when)
    return family


def _by_state(name: str, doc: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["state"])
    for state, n in sorted(counts.items()):
        family.add_metric([state], n)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _metrics(m: NodeMetrics) -> Iterator[Metric]:
    values: dict[str, int] = {name: 0 for name in COUNTERS} | m.counters
    seen = set(FAMILIES)
    for name, value in sorted(values.items()):
        metric = _NAME.sub("_", name)
        if metric in seen:
            continue
        seen.add(metric)
        doc = COUNTERS.get(name, f"The node's {name.replace('_', ' ')} (catalog counter).")
        yield CounterMetricFamily(f"{PREFIX}_{metric}", doc, value=value)
    yield _by_state("studies", "Studies in the catalog by state.", m.studies)
    yield _gauge("instances", "Instances the catalog holds now.", m.instances)
    yield _gauge(
        "instance_bytes", "Bytes of the instances the catalog holds now.", m.instance_bytes
    )
    yield _by_state("jobs", "Jobs by state.", m.jobs)
    yield _gauge("queue_depth", "Jobs queued and waiting for a worker.", m.queue_depth)
    yield _by_state("deliveries", "Deliveries by state.", m.deliveries)
    yield _gauge("quarantine_held", "Instances held in quarantine.", m.quarantine_held)
    yield _gauge(
        "recorder_catalog_available",
        "Whether the ingest recorder reaches the catalog (1) or spools through an outage (0).",
        int(m.recorder_catalog_available),
    )
    yield _gauge(
        "recorder_unrecorded",
        "Instances acknowledged but not yet recorded in the catalog.",
        m.recorder_unrecorded,
    )
    seconds = GaugeMetricFamily(
        f"{PREFIX}_job_stage_seconds",
        "Seconds a pipeline stage took: quantiles over the recently finished jobs.",
        labels=["stage", "quantile"],
    )
    jobs = GaugeMetricFamily(
        f"{PREFIX}_job_stage_recent_jobs",
        "Recently finished jobs that ran the stage (the quantiles' sample).",
        labels=["stage"],
    )
    for stage, timing in m.stages.items():
        for q, took in timing.quantiles.items():
            seconds.add_metric([stage, f"{q:g}"], took)
        jobs.add_metric([stage], timing.jobs)
    yield seconds
    yield jobs
    if m.group is not None:
        yield from _group(m.group)


def _group(group: GroupView) -> Iterator[Metric]:
    """The job-queue backend, the timer lease's owner and the registered nodes."""
    queue = group.job_queue
    info = GaugeMetricFamily(
        f"{PREFIX}_job_queue_info",
        "Who runs the jobs: local (this node's job workers) or celery (workers through the "
        "broker; its URL without the password). Always 1.",
        labels=["backend", "broker"],
    )
    info.add_metric([queue.backend, queue.broker], 1)
    yield info
    queued = GaugeMetricFamily(
        f"{PREFIX}_job_queue_queued",
        "Jobs queued in the catalog per broker queue (celery), waiting for a worker.",
        labels=["queue"],
    )
    for name, n in queue.queued.items():
        queued.add_metric([name], n)
    yield queued
    lease = group.timer_lease
    owner = GaugeMetricFamily(
        f"{PREFIX}_timer_lease_owner",
        "1 for the node that holds the timer lease now (assembly timers, routing, "
        "housekeeping); no sample while none does.",
        labels=["node_id"],
    )
    if lease.held:
        owner.add_metric([lease.owner_node_id], 1)
    yield owner
    yield _gauge(
        "timer_lease_expiry_timestamp_seconds",
        "When the timer lease runs out unless renewed (Unix seconds; 0: never taken).",
        lease.expires_at.timestamp() if lease.expires_at is not None else 0,
    )
    yield _gauge(
        "timer_lease_is_owner",
        "Whether this node (its node_id) holds the timer lease now.",
        int(lease.mine),
    )
    registered = GaugeMetricFamily(
        f"{PREFIX}_registered_nodes",
        "Nodes registered on the catalog: live (heartbeat within timer_lease_s) or stale.",
        labels=["state"],
    )
    live = sum(1 for n in group.nodes if n.live)
    registered.add_metric(["live"], live)
    registered.add_metric(["stale"], len(group.nodes) - live)
    yield registered


def _registry(request: Request) -> CollectorRegistry:
    """The app's registry, made with its collector at the first scrape."""
    state = request.app.state
    with _lock:
        registry = getattr(state, "metrics_registry", None)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(CatalogCollector(web_context(request)))
            state.metrics_registry = registry
    assert isinstance(registry, CollectorRegistry)
    return registry


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)
