"""``pacs-node serve``: the node in the foreground."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from pacs_node.cli.common import ConfigOption, settings_for
from pacs_node.cli.console import FAILED, fail
from pacs_node.errors import PacsNodeError


def serve(
    config: ConfigOption = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title.")] = None,
    dicom_host: Annotated[str | None, typer.Option(help="Address the DICOM port binds.")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port.")] = None,
    web_port: Annotated[int | None, typer.Option(help="Web port.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Spool and catalog folder.")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the catalog.")] = None,
    quiet_period_s: Annotated[
        float | None, typer.Option(help="Seconds without new instances before a study is stable.")
    ] = None,
    promiscuous: Annotated[
        bool | None, typer.Option("--promiscuous/--no-promiscuous", help="Accept any calling AE.")
    ] = None,
) -> None:
    """Run the node: Storage SCP, catalog and study assembly. SIGTERM or SIGINT stops it
    (exit 0); a second one, or the stop outlasting stop_timeout_s, forces it (128 + signal)."""
    settings = settings_for(
        config,
        {
            "ae_title": ae_title,
            "dicom_host": dicom_host,
            "dicom_port": dicom_port,
            "web_port": web_port,
            "data_dir": data_dir,
            "database_url": database_url,
            "quiet_period_s": quiet_period_s,
            "promiscuous": promiscuous,
        },
    )
    from pacs_node.lifecycle import SignalPipe
    from pacs_node.node import Node

    try:
        node = Node(settings)
        node.start()
    except (PacsNodeError, OSError) as exc:
        fail(f"cannot start: {exc}", FAILED)
    # From here SIGTERM and SIGINT are only recorded; the node acts on them in run().
    code = node.run(SignalPipe((signal.SIGTERM, signal.SIGINT)))
    raise typer.Exit(code)
