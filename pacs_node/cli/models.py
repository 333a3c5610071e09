"""``pacs-node models`` and ``evaluate``: the installed bundles, and how well one segments."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TextColumn
from rich.table import Table

from pacs_node.cli.common import (
    ConfigOption,
    JsonOption,
    ModelArgument,
    ModelsDirOption,
    settings_for,
)
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.errors import PacsNodeError


def models(
    config: ConfigOption = None, models_dir: ModelsDirOption = None, json_output: JsonOption = False
) -> None:
    """List the model bundles and their labels; a broken bundle is an error."""
    settings = settings_for(config, {"models_dir": models_dir})
    from pacs_node.services.models import list_models

    try:
        entries = list_models(settings)
    except PacsNodeError as exc:
        fail(str(exc), FAILED)
    if json_output:
        print_json([entry.as_json() for entry in entries])
        return
    table = Table(title=f"{len(entries)} models in {settings.node.models_dir}")
    for column in ("Name", "Version", "Kind", "Modalities", "Labels", "SHA-256"):
        table.add_column(column)
    for entry in entries:
        b = entry.bundle
        labels = ", ".join(f"{s.value}={s.name}" for s in b.segments)
        digest = b.sha256[:16] + ("" if entry.allowed else " (not allowed)")
        table.add_row(
            b.name, b.version, str(b.kind), ", ".join(b.modalities) or "any", labels, digest
        )
    out.print(table)


def evaluate(
    model: ModelArgument,
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
    settings = settings_for(config, {"models_dir": models_dir})
    from pacs_node.evaluation.report import evaluate as run_evaluation
    from pacs_node.evaluation.report import markdown, write_report
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner

    mapping: dict[str, int] | None = None
    if label_map is not None:
        try:
            mapping = json.loads(label_map.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"{label_map}: {exc}")
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
            fail(str(exc), FAILED)
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
