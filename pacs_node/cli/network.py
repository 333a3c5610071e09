"""``pacs-node send`` and ``echo``: C-STORE and C-ECHO to a DICOM peer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pacs_node.cli.common import JsonOption
from pacs_node.cli.console import FAILED, err, fail, out, print_json

CallingAeOption = Annotated[str, typer.Option(help="Our AE title on this association.")]


def send(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to send.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="Destination as AE@HOST:PORT.")],
    calling_ae: CallingAeOption = "PACSNODE_SCU",
    json_output: JsonOption = False,
) -> None:
    """Send DICOM files with C-STORE, each in its own transfer syntax."""
    from pacs_node.scu import Peer, SendReport, scan
    from pacs_node.scu import send as send_files

    try:
        peer = Peer.parse(to)
    except ValueError as exc:
        fail(str(exc))
    report = SendReport()
    files = scan(paths, report)
    with Progress(
        TextColumn("[bold]C-STORE[/] to " + str(peer)),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=json_output or not err.is_terminal,
    ) as progress:
        task = progress.add_task("send", total=len(files))
        send_files(files, peer, calling_ae, report, lambda n: progress.advance(task, n))
    if json_output:
        summary = {
            "sent": report.sent,
            "failed": [{"path": str(p), "reason": r} for p, r in report.failed],
            "skipped": [{"path": str(p), "reason": r} for p, r in report.skipped],
        }
        print_json(summary, ascii_only=True)
    else:
        for path, reason in report.failed:
            err.print(f"[red]failed[/] {path}: {reason}", highlight=False)
        err.print(
            f"sent {report.sent}, failed {len(report.failed)}, skipped {len(report.skipped)}",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(FAILED)


def echo(
    target: Annotated[str, typer.Argument(help="AE@HOST:PORT")],
    calling_ae: CallingAeOption = "PACSNODE_SCU",
) -> None:
    """Check a DICOM peer with C-ECHO."""
    from pacs_node.scu import Peer
    from pacs_node.scu import echo as c_echo

    try:
        peer = Peer.parse(target)
        seconds = c_echo(peer, calling_ae)
    except (ValueError, ConnectionError, OSError) as exc:
        fail(f"C-ECHO {target}: {exc}", FAILED)
    out.print(f"C-ECHO {peer}: success in {seconds * 1000:.1f} ms", highlight=False)
