"""``pacs-node segment``: one series, one model, outside the node."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from pacs_node.cli.common import (
    ConfigOption,
    JsonOption,
    ModelArgument,
    ModelsDirOption,
    settings_for,
)
from pacs_node.cli.console import FAILED, err, fail, print_json
from pacs_node.errors import PacsNodeError

STAGES = ("read", "load", "preprocess", "infer", "postprocess", "write", "results")


def segment(
    model: ModelArgument,
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
    settings = settings_for(config, {"models_dir": models_dir, "torch_threads": threads})
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner
    from pacs_node.results import ResultOptions
    from pacs_node.segment import segment_paths

    with Progress(
        TextColumn("[bold]segment[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        disable=json_output or not err.is_terminal,
    ) as progress:
        task = progress.add_task(model, total=len(STAGES))

        def advance(stage: str) -> None:
            done = STAGES.index(stage) if stage in STAGES else 0
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
            fail(str(exc), FAILED)
        progress.update(task, completed=len(STAGES), description=f"{model}: done")
    if json_output:
        print_json(report.as_json(), ascii_only=True)
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
