"""``pacs-node demo``: a phantom CT study through the running node, and where its results went.

Progress goes to stderr; the table of
results (or ``--json``) to stdout. Exit status 0 when every job is done and no delivery is
dead; 1 when the node does not answer, the study is not routed, a job fails or a delivery is
dead-lettered; 2 for a bad option or configuration.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.config import Settings

if TYPE_CHECKING:
    from pacs_node.demo import Progress as DemoProgress
    from pacs_node.scu import Peer

POLL_S = 0.25
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def _node_address(settings: Settings, to: str | None) -> Peer:
    from pacs_node.scu import Peer

    if to is not None:
        return Peer.parse(to)
    options = settings.node
    if not options.dicom_port:
        raise ValueError(
            f"node.yaml has dicom_port: 0 (DICOM TLS only, port {options.dicom_tls_port}) and "
            "the demo sends plain DICOM: name a node's plain port with --to AE@HOST:PORT"
        )
    host = "127.0.0.1" if options.dicom_host in _ANY_ADDRESS else options.dicom_host
    return Peer(options.ae_title, host, options.dicom_port)


def demo(
    to: Annotated[
        str | None,
        typer.Option("--to", help="The node as AE@HOST:PORT (default: from node.yaml)."),
    ] = None,
    calling_ae: Annotated[
        str, typer.Option(help="Our AE title (peers.yaml must let it send).")
    ] = "PACSNODE_SCU",
    seed: Annotated[
        int | None, typer.Option(help="Phantom seed; the same seed makes the same study.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the node.")] = 600.0,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Send a phantom CT study to the running node, follow it through routing, the job and
    delivery, and print where every result went."""
    from pacs_node.catalog.db import open_catalog
    from pacs_node.demo import follow, make_study
    from pacs_node.errors import PacsNodeError
    from pacs_node.scu import SendReport, echo, scan, send

    settings = settings_for(config)
    try:
        node = _node_address(settings, to)
    except ValueError as exc:
        fail(str(exc))
    try:
        echo(node, calling_ae)
    except ConnectionError as exc:
        fail(
            f"nothing answers at {node} ({exc}): start the node with `pacs-node serve`, or "
            "name it with --to; its peers.yaml must let "
            f"{calling_ae} send from this host",
            FAILED,
        )
    try:
        catalog = open_catalog(settings.node.catalog_url, run_migrations=False)
    except PacsNodeError as exc:
        fail(f"{exc} (--config must be the running node's configuration)", FAILED)
    seed = seed if seed is not None else random.SystemRandom().randrange(1_000_000, 2**31)
    display = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=json_output,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="pacs-node-demo-") as folder, display:
            task = display.add_task(f"rendering phantom CT (seed {seed})", total=None)
            study_uid, paths = make_study(Path(folder), seed)
            display.update(task, description=f"C-STORE {len(paths)} images to {node}", total=1)
            report = SendReport()
            send(scan(paths, report), node, calling_ae, report)
            if not report.ok:
                reason = report.failed[0][1]
                fail(f"{len(report.failed)} of {len(paths)} images refused: {reason}", FAILED)
            sent_at = time.monotonic()
            deadline = sent_at + timeout
            while True:
                progress = follow(catalog, study_uid, len(paths))
                display.update(
                    task,
                    description=progress.phase,
                    completed=progress.job_progress,
                    total=1,
                )
                if progress.finished:
                    break
                if time.monotonic() > deadline:
                    fail(
                        f"gave up after {timeout:.0f} s: {progress.phase} "
                        f"(study {study_uid}; `pacs-node studies`, `jobs`, `deliveries`)",
                        FAILED,
                    )
                time.sleep(POLL_S)
            elapsed = time.monotonic() - sent_at
    finally:
        catalog.dispose()
    if progress.not_routed is not None:
        _explain(settings, study_uid, progress.not_routed)
        raise typer.Exit(FAILED)
    _report(progress, elapsed, json_output, study_url(settings, study_uid))
    failed = [j for j in progress.jobs if j.state != "done"]
    dead = [d for d in progress.deliveries if d.state == "dead"]
    if failed or dead:
        raise typer.Exit(FAILED)


def _explain(settings: Settings, study_uid: str, why: str) -> None:
    """Say why the study was not routed, rule by rule (what ``routes explain`` says)."""
    from pacs_node.services.routes import explain_study

    err.print(f"[bold red]error:[/] study {study_uid} was not routed: {why}", highlight=False)
    with opened_catalog(settings) as catalog:
        verdicts = explain_study(catalog, settings, study_uid).verdicts
    if not verdicts:
        err.print("  routes.yaml has no rules (or none enabled)", highlight=False)
    for verdict in verdicts:
        err.print(f"  rule {verdict.rule}: {verdict.reason}", highlight=False)
    err.print(f"  details: pacs-node routes explain {study_uid}", highlight=False)


def study_url(settings: Settings, study_uid: str) -> str | None:
    """The study's page in the node's own web face; None when the node serves none."""
    options = settings.node
    if not options.web_port:
        return None
    host = "localhost" if options.web_host in _ANY_ADDRESS else options.web_host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{options.web_port}/studies/{study_uid}"


def _report(progress: DemoProgress, elapsed: float, json_output: bool, url: str | None) -> None:
    from pacs_node.catalog.deliveries import HELD_FOR_DESTINATION

    if json_output:
        print_json(
            {
                "study_uid": progress.study_uid,
                "url": url,
                "instances": progress.expected,
                "seconds": round(elapsed, 2),
                "jobs": [j.as_json() for j in progress.jobs],
                "deliveries": [d.as_json() for d in progress.deliveries],
            },
            ascii_only=True,
        )
        return
    for job in progress.jobs:
        seconds = job.timings.get("total_s", 0.0)
        err.print(
            f"job {job.id} {job.model}: {job.state} in {seconds:.1f} s {job.error or ''}".strip(),
            highlight=False,
        )
    table = Table(title=f"results of study {progress.study_uid} ({elapsed:.1f} s after sending)")
    for column in ("Result", "SOP Instance UID", "Destination", "State", "Detail"):
        table.add_column(column)
    for d in progress.deliveries:
        detail = d.last_error or ""
        if d.state == "delivered":
            detail = d.transfer_syntax_uid or ""
        table.add_row(d.kind, d.sop_instance_uid or "", d.destination, d.state, detail[:70])
    out.print(table)
    if not progress.deliveries:
        err.print("the job named no destination: its results are stored in the node only")
    held = [d for d in progress.deliveries if d.held_for == HELD_FOR_DESTINATION]
    if held:
        names = ", ".join(sorted({d.destination for d in held}))
        err.print(
            f"{len(held)} results wait in the node: no address for {names}. Give the peer a "
            "port in peers.yaml (or a destination), restart the node, and they are sent; "
            "`pacs-node deliveries` lists them.",
            highlight=False,
        )
    retrying = [d for d in progress.deliveries if d.state == "pending"]
    if retrying:
        err.print(
            f"{len(retrying)} deliveries failed once and will be retried with backoff "
            "(`pacs-node deliveries`)",
            highlight=False,
        )
    if url is not None:
        err.print("open the study and its results in the node's viewer:", highlight=False)
        err.print(url, highlight=False, soft_wrap=True)  # whole, on a line of its own
