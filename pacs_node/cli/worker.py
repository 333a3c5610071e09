"""``pacs-node worker``: run the node's jobs from a Celery broker (``job_queue: celery``)."""

from __future__ import annotations

from typing import Annotated

import typer

from pacs_node.cli.common import ConfigOption, settings_for
from pacs_node.cli.console import fail
from pacs_node.cpus import inference_threads, limit_threads
from pacs_node.errors import CatalogError
from pacs_node.inference.queues import DEFAULT_QUEUE, valid_queue


def _queues(text: str | None) -> list[str]:
    names = [part.strip() for part in (text or DEFAULT_QUEUE).split(",") if part.strip()]
    if not names:
        fail("--queues: name at least one device class, e.g. cpu or gpu")
    for name in names:
        if not valid_queue(name):
            fail(f"--queues: {name[:40]!r} is not a device class (short lower-case, e.g. gpu)")
    return list(dict.fromkeys(names))


def worker(
    config: ConfigOption = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Device classes to take jobs of, comma-separated (a bundle's pacs_node.queue).",
            show_default=DEFAULT_QUEUE,
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="Jobs at once: 1 in this process, more forked.")
    ] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL of the catalog (in production set PACS_NODE_DATABASE_URL: "
            "a command line shows in ps)."
        ),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            help="The Celery broker's URL (in production set PACS_NODE_BROKER_URL: a command "
            "line shows in ps)."
        ),
    ] = None,
) -> None:
    """Run jobs from the Celery broker with the node's pipeline, until SIGTERM (which lets the
    running jobs finish). The node must run with job_queue: celery on the same catalog."""
    settings = settings_for(
        config, {"database_url": database_url, "broker_url": broker_url, "job_queue": "celery"}
    )
    names = _queues(queues)
    # before numpy loads (the worker module imports it): OpenBLAS and MKL size their pools
    # once, at load, and forked processes inherit them
    limit_threads(inference_threads(settings.node.torch_threads, concurrency))
    from pacs_node.jobs.celery_worker import start_worker

    try:
        status = start_worker(settings, names, concurrency)
    except CatalogError as exc:  # its text names the URL without its password
        fail(f"the worker cannot use the catalog: {exc}")
    raise typer.Exit(status)
