"""The ``pacs-node`` command line (typer + rich).

JSON output goes alone to stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pacs_node import __version__
from pacs_node.cli_demo import register as register_demo_command
from pacs_node.cli_ingest import register as register_ingest_commands
from pacs_node.cli_pipeline import register as register_pipeline_commands
from pacs_node.config import Settings, load_settings
from pacs_node.errors import PacsNodeError
from pacs_node.logs import configure_node_logging
from pacs_node.routing.commands import routes_app
from pacs_node.training.command import train as train_command

app = typer.Typer(
    name="pacs-node",
    help="A DICOM AI node: receives studies, segments them, returns results to PACS and EHR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
register_pipeline_commands(app)  # jobs, run, deliveries
register_demo_command(app)
register_ingest_commands(app)  # quarantine, status

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Folder with node.yaml, peers.yaml and routes.yaml.", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only, on stdout.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _settings(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        settings = load_settings(config, overrides)
    except PacsNodeError as exc:
        raise _fail(f"configuration: {exc}") from exc
    configure_node_logging(settings.node)
    return settings


@app.command()
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
    settings = _settings(
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
        raise _fail(f"cannot start: {exc}", 1) from exc
    # From here SIGTERM and SIGINT are only recorded; the node acts on them in run().
    code = node.run(SignalPipe((signal.SIGTERM, signal.SIGINT)))
    raise typer.Exit(code)


@app.command()
def studies(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List received studies with their series and assembly state."""
    settings = _settings(config)
    from pacs_node.catalog.db import open_catalog, sqlite_file
    from pacs_node.catalog.studies import list_studies

    url = settings.node.catalog_url
    path = sqlite_file(url)
    summaries = []
    if path is None or path.exists():
        try:
            catalog = open_catalog(url, run_migrations=False)
        except PacsNodeError as exc:
            raise _fail(str(exc), 1) from exc
        try:
            with catalog.sessions() as session:
                summaries = list_studies(session)
        finally:
            catalog.dispose()
    if json_output:
        sys.stdout.write(json.dumps([s.as_json() for s in summaries], ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{len(summaries)} studies")
    columns = (
        "Study Instance UID",
        "State",
        "Status",
        "Received",
        "Series",
        "Instances",
        "Quarantined",
    )
    for column in (*columns, "Modalities"):
        table.add_column(column)
    for s in summaries:
        modalities = ", ".join(sorted({x.modality or "?" for x in s.series}))
        table.add_row(
            s.study_uid,
            s.state,
            s.status or "",
            s.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(len(s.series)),
            str(s.instances),
            str(s.quarantined),
            modalities,
        )
    out.print(table)


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to send.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="Destination as AE@HOST:PORT.")],
    calling_ae: Annotated[
        str, typer.Option(help="Our AE title on this association.")
    ] = "PACSNODE_SCU",
    json_output: JsonOption = False,
) -> None:
    """Send DICOM files with C-STORE, each in its own transfer syntax."""
    from pacs_node.scu import Peer, SendReport, scan
    from pacs_node.scu import send as send_files

    try:
        peer = Peer.parse(to)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
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
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        for path, reason in report.failed:
            err.print(f"[red]failed[/] {path}: {reason}", highlight=False)
        err.print(
            f"sent {report.sent}, failed {len(report.failed)}, skipped {len(report.skipped)}",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def echo(
    target: Annotated[str, typer.Argument(help="AE@HOST:PORT")],
    calling_ae: Annotated[
        str, typer.Option(help="Our AE title on this association.")
    ] = "PACSNODE_SCU",
) -> None:
    """Check a DICOM peer with C-ECHO."""
    from pacs_node.scu import Peer
    from pacs_node.scu import echo as c_echo

    try:
        peer = Peer.parse(target)
        seconds = c_echo(peer, calling_ae)
    except (ValueError, ConnectionError, OSError) as exc:
        raise _fail(f"C-ECHO {target}: {exc}", 1) from exc
    out.print(f"C-ECHO {peer}: success in {seconds * 1000:.1f} ms", highlight=False)


ModelsDirOption = Annotated[
    Path | None, typer.Option("--models-dir", help="Folder of model bundles.", show_default=False)
]


@app.command()
def models(
    config: ConfigOption = None, models_dir: ModelsDirOption = None, json_output: JsonOption = False
) -> None:
    """List the model bundles and their labels; a broken bundle is an error."""
    settings = _settings(config, {"models_dir": models_dir})
    from pacs_node.inference.registry import Registry

    try:
        bundles = Registry(settings.node.models_dir).load_all()
    except PacsNodeError as exc:
        raise _fail(str(exc), 1) from exc
    allowlist = settings.node.model_sha256_allowlist

    def allowed(sha256: str) -> bool:
        return not allowlist or sha256 in allowlist

    if json_output:
        entries = [{**b.as_json(), "allowed": allowed(b.sha256)} for b in bundles]
        sys.stdout.write(json.dumps(entries, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{len(bundles)} models in {settings.node.models_dir}")
    for column in ("Name", "Version", "Kind", "Modalities", "Labels", "SHA-256"):
        table.add_column(column)
    for b in bundles:
        labels = ", ".join(f"{s.value}={s.name}" for s in b.segments)
        digest = b.sha256[:16] + ("" if allowed(b.sha256) else " (not allowed)")
        table.add_row(
            b.name, b.version, str(b.kind), ", ".join(b.modalities) or "any", labels, digest
        )
    out.print(table)


@app.command()
def segment(
    model: Annotated[str, typer.Argument(help="Model bundle name (see `pacs-node models`).")],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders of one series.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the labels and the result objects.")
    ],
    series: Annotated[
        str | None, typer.Option("--series", help="SeriesInstanceUID when several are given.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for inference (default: config).")
    ] = None,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on GPU.")] = False,
    results: Annotated[
        bool,
        typer.Option(
            "--results/--no-results",
            help="Also write SEG, SR, GSPS, key images, PDF and the FHIR Bundle.",
        ),
    ] = True,
    jpeg2000: Annotated[
        bool, typer.Option("--jpeg2000", help="Also write a JPEG 2000 lossless SEG copy.")
    ] = False,
    config: ConfigOption = None,
    models_dir: ModelsDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Segment one DICOM series with one model; writes labels.nii.gz, labels.json and the
    result objects (dicom/, alternates/, report.pdf, fhir-bundle.json)."""
    settings = _settings(config, {"models_dir": models_dir, "torch_threads": threads})
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner
    from pacs_node.results import ResultOptions
    from pacs_node.segment import segment_paths

    stages = ("read", "load", "preprocess", "infer", "postprocess", "write", "results")
    with Progress(
        TextColumn("[bold]segment[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        disable=json_output or not err.is_terminal,
    ) as progress:
        task = progress.add_task(model, total=len(stages))

        def advance(stage: str) -> None:
            done = stages.index(stage) if stage in stages else 0
            progress.update(task, completed=done, description=f"{model}: {stage}")

        try:
            runner = Runner(
                Registry(settings.node.models_dir, settings.node.model_sha256_allowlist),
                device=device,
                threads=settings.node.torch_threads,
                amp=amp,
            )
            report = segment_paths(
                runner,
                model,
                paths,
                out_dir,
                series_uid=series,
                progress=advance,
                results=ResultOptions(jpeg2000_copy=jpeg2000) if results else None,
            )
        except PacsNodeError as exc:
            raise _fail(str(exc), 1) from exc
        progress.update(task, completed=len(stages), description=f"{model}: done")
    if json_output:
        sys.stdout.write(json.dumps(report.as_json()) + "\n")
        return
    t = report.segmentation.timings
    found = ", ".join(f"{name} {count}" for name, count in report.voxels.items())
    err.print(f"wrote {report.nifti} and {report.labels_json}", highlight=False)
    if report.results:
        err.print(f"wrote {len(report.results)} result files into {out_dir}", highlight=False)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False)
    err.print(f"voxels: {found}", highlight=False)
    verdict = report.verdict
    if verdict.passed:
        err.print("quality gate: pass", highlight=False)
    else:
        err.print(
            f"quality gate: FAIL ({len(verdict.failures)} checks; in the node this result "
            "would be held or flagged, see labels.json)",
            highlight=False,
        )
        for failure in verdict.failures:
            err.print(f"  {failure.check} {failure.label}: {failure.message}", highlight=False)
    err.print(
        f"time {t.total:.2f} s (decode {t.decode:.2f}, load {t.load:.2f}, preprocess "
        f"{t.preprocess:.2f}, infer {t.infer:.2f}, postprocess {t.postprocess:.2f}) "
        f"on {report.segmentation.device}",
        highlight=False,
    )


app.command("train")(train_command)


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model bundle name (see `pacs-node models`).")],
    data: Annotated[
        Path, typer.Argument(help="Case folders (DICOM + DICOM-SEG) or a Decathlon folder.")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for metrics.json, report.md, box plots.")
    ] = Path("evaluation"),
    label_map: Annotated[
        Path | None, typer.Option("--labels", help='JSON map of truth names: {"liver": 1}.')
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N cases.")] = None,
    description: Annotated[str, typer.Option(help="What the cases are (for the report).")] = "",
    config: ConfigOption = None,
    models_dir: ModelsDirOption = None,
) -> None:
    """Measure a model on labelled cases at their source resolution: Dice, IoU, HD95, ASD,
    precision, recall and volume error per case and label."""
    settings = _settings(config, {"models_dir": models_dir})
    from pacs_node.evaluation.report import evaluate as run_evaluation
    from pacs_node.evaluation.report import markdown, write_report
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner

    mapping = None
    if label_map is not None:
        try:
            mapping = json.loads(label_map.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _fail(f"{label_map}: {exc}") from exc
    with Progress(
        TextColumn("[bold]evaluate[/] {task.description}"), console=err, transient=True
    ) as progress:
        task = progress.add_task(model)

        def advance(done: int, case: str) -> None:
            progress.update(task, description=f"{model}: {done} cases ({case})")

        try:
            registry = Registry(settings.node.models_dir, settings.node.model_sha256_allowlist)
            runner = Runner(registry, threads=settings.node.torch_threads)
            report = run_evaluation(
                runner, model, data, label_map=mapping, limit=limit, progress=advance
            )
        except PacsNodeError as exc:
            raise _fail(str(exc), 1) from exc
    dataset = data / "dataset.json"
    if not description and dataset.is_file():
        description = str(json.loads(dataset.read_text(encoding="utf-8")).get("description", ""))
    report["description"] = description
    report["command"] = " ".join(["pacs-node", *sys.argv[1:]])
    write_report(report, out_dir)
    bundle_root = (settings.node.models_dir / model).resolve()
    if bundle_root in out_dir.resolve().parents and (bundle_root / "configs").is_dir():
        from pacs_node.training.card import refresh_card

        refresh_card(bundle_root)
    out.print(markdown(report), highlight=False)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"pacs-node {__version__}", highlight=False)


app.add_typer(routes_app, name="routes")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
