"""``pacs-node status``: the node's health as the catalog and the spool tell it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, settings_for
from pacs_node.cli.console import FAILED, out, print_json

if TYPE_CHECKING:
    from pacs_node.services.status import NodeHealth


def status(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """The node's health as the catalog and the spool tell it: catalog reachable or not (and
    since when the recorder could not write), counters, quarantine and studies held."""
    from pacs_node.services.status import node_health

    health = node_health(settings_for(config))
    if json_output:
        print_json(health.as_json())
    else:
        recorder = health.recorder
        table = Table(title="pacs-node status")
        table.add_column("What")
        table.add_column("Value")
        table.add_row("healthy", str(health.healthy))
        table.add_row("catalog reachable", str(health.counts is not None))
        since = recorder.get("outage_since")
        if isinstance(since, int | float | str) and since:
            table.add_row("recorder outage", f"{time.time() - float(since):.0f} s")
        if recorder.get("unrecorded"):
            table.add_row("unrecorded instances", str(recorder["unrecorded"]))
        if health.counts is not None:
            table.add_row("studies", str(health.counts.studies))
            table.add_row("quarantine held", str(health.counts.quarantine_held))
            for name, value in sorted(health.counts.counters.items()):
                table.add_row(name, str(value))
        _group_rows(table, health)
        out.print(table)
    if not health.healthy:
        raise typer.Exit(FAILED)


def _group_rows(table: Table, health: NodeHealth) -> None:
    """The job queue, the timer lease's owner and the registered nodes (a group of nodes)."""
    queue = health.group.job_queue if health.group is not None else health.configured_queue
    if queue is not None:
        table.add_row("job queue", queue.backend)
        if queue.backend == "celery":
            table.add_row("broker", queue.broker)
            if not queue.queued:
                table.add_row("queued jobs", "none")
            for name, n in queue.queued.items():
                table.add_row(f"queued in {name}", str(n))
        else:
            table.add_row("local job workers", str(queue.workers))
    if health.group is None:
        return
    lease = health.group.timer_lease
    if lease.held and lease.expires_at is not None:
        until = lease.expires_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        mine = " (this node)" if lease.mine else ""
        table.add_row("timer lease owner", f"{lease.owner_node_id}{mine}, until {until}")
    else:
        table.add_row("timer lease owner", "none (no node holds it now)")
    for node in health.group.nodes:
        state = "live" if node.live else "stale"
        table.add_row(f"node {node.node_id}", f"{state}: host {node.host}, pid {node.pid}")
